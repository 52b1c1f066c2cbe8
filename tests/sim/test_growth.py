"""How the work per round grows with the cluster: 3 to 50 real nodes in the simulator.

Calm network (2 ms latency). Every peer link pulls once as it starts and then every
ANTI_ENTROPY_INTERVAL (3 s), all at the same moments here, since all start at once; so
the ROUNDS rounds (started at node_001, ROUND_GAP apart) run between the start-up pulls
and the first periodic ones, and what they cost is counted there: gossip requests and
bytes, signatures made and verified, and the simulated cluster's CPU (every node's work
and the simulator's, on one core). Anti-entropy, a cost per second whatever the rounds,
is counted over the next full interval, which starts with one more round as every link
pulls: the pull wave's own gossip is counted too. (A pull's bytes grow with the rounds
held, up to 100; here there are four.) Printed as JSON (docs/benchmarks.md has the
table); the asserts are on counts, which are deterministic, never on time. Then seeded
fault scenarios on 25 and 50 nodes keep every invariant.
"""

from __future__ import annotations

import collections
import json
import time
from typing import Any

import attrs
import pytest
import trio

from anna_trio import crypto
from anna_trio.consensus import COMPLETE
from anna_trio.peers import ANTI_ENTROPY_INTERVAL

from .cluster import Cluster, ClusterSpec, json_body
from .network import Faults
from .runner import Case, run_script, run_seeds
from .scenario import scenario_for
from .test_sim import WORKERS

ROUNDS = 3
ROUND_GAP = 0.6
FIRST_ROUND = 1.0
SIZES = (3, 5, 7, 15, 25, 50)


class _Counting:
    """Counts calls of a crypto function, as the node makes them (crypto.X)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls = 0
        real = getattr(crypto, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(crypto, name, counted)


def _measure(size: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    verified = _Counting(monkeypatch, "verify_observation")
    signed = _Counting(monkeypatch, "sign_observation")
    row: dict[str, Any] = {"nodes": size}

    async def script(cluster: Cluster) -> None:
        network = cluster.network
        await trio.sleep_until(FIRST_ROUND)
        requests, sent = collections.Counter(network.requests), collections.Counter(network.bytes)
        verified.calls = signed.calls = 0
        cpu = time.process_time()
        for index in range(ROUNDS):
            await trio.sleep_until(FIRST_ROUND + index * ROUND_GAP)
            with trio.fail_after(1.0):
                answer = await cluster.ask(
                    "node_001", "POST", "/rpc/round/start", json_body({"round_id": f"r{index:03d}"})
                )
            assert answer is not None and answer.status == 202
        nodes = cluster.running_nodes()
        with trio.fail_after(ANTI_ENTROPY_INTERVAL - FIRST_ROUND - ROUNDS * ROUND_GAP):
            while not all(  # noqa: ASYNC110 - engine state has no event to wait on
                len(node.engine.round_ids()) == ROUNDS
                and all(view.status == COMPLETE for view in node.engine.rounds())
                for node in nodes.values()
            ):
                await trio.sleep(0.01)
        cpu = time.process_time() - cpu
        gossip = network.requests["/rpc/gossip"] - requests["/rpc/gossip"]
        row.update(
            gossip_requests_per_round=round(gossip / ROUNDS, 1),
            gossip_kib_per_round=round(
                (network.bytes["/rpc/gossip"] - sent["/rpc/gossip"]) / ROUNDS / 1024, 1
            ),
            other_requests_in_rounds=sum(network.requests.values())
            - sum(requests.values())
            - gossip
            - ROUNDS,
            signatures_per_round=signed.calls / ROUNDS,
            verifications_per_round=round(verified.calls / ROUNDS, 1),
            verifications_per_observation=round(verified.calls / (ROUNDS * size * (size - 1)), 2),
            cpu_ms_per_round=round(cpu * 1000 / ROUNDS),
            complete_with=min(
                len(view.result.participating_nodes)
                for node in nodes.values()
                for view in node.engine.rounds()
            ),
        )
        await trio.sleep_until(ANTI_ENTROPY_INTERVAL - 0.01)
        requests = collections.Counter(network.requests)
        pulled = network.bytes["/rpc/sync"]
        await trio.sleep_until(ANTI_ENTROPY_INTERVAL)
        with trio.fail_after(1.0):  # a round started as every link pulls
            await cluster.ask(
                "node_001", "POST", "/rpc/round/start", json_body({"round_id": "wave"})
            )
        await trio.sleep_until(2 * ANTI_ENTROPY_INTERVAL - 0.01)
        row.update(
            sync_requests_per_second=round(
                (network.requests["/rpc/sync"] - requests["/rpc/sync"]) / ANTI_ENTROPY_INTERVAL, 1
            ),
            sync_bytes_per_pull=round(
                (network.bytes["/rpc/sync"] - pulled)
                / (network.requests["/rpc/sync"] - requests["/rpc/sync"])
            ),
            gossip_requests_in_a_pull_wave=network.requests["/rpc/gossip"]
            - requests["/rpc/gossip"],
        )

    run_script(ClusterSpec(size=size), script, faults=Faults(latency=0.002), trace_bodies=False)
    return row


def test_work_per_round_as_the_cluster_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between pull waves a round costs 2(N-1) gossip requests (4 at 3 nodes, which
    send directly), every node signs once and verifies each other node's observation
    once, and completes with every node; anti-entropy pulls N(N-1)/3 times a second.
    A round started as the links pull costs more: peers that learn of it from a pull
    answer broadcast their observation to everyone (reported, not asserted)."""
    rows = []
    for size in SIZES:
        with monkeypatch.context() as patched:
            rows.append(_measure(size, patched))
        print(json.dumps(rows[-1]))
    for row in rows:
        size = row["nodes"]
        assert row["complete_with"] == size, row
        assert row["signatures_per_round"] == size, row
        assert row["verifications_per_round"] == size * (size - 1), row
        assert row["gossip_requests_per_round"] == (4 if size == 3 else 2 * (size - 1)), row
        assert row["sync_requests_per_second"] == round(
            size * (size - 1) / ANTI_ENTROPY_INTERVAL, 1
        )
    print(json.dumps({"growth": rows}))


def _faulty_seeds(size: int, count: int) -> list[int]:
    """The first seeds whose scenario on `size` nodes has equivocating Byzantine nodes,
    nemeses and a lossy network."""
    found = []
    for seed in range(1000):
        scenario = scenario_for(seed, size=size)
        if (
            "equivocate" in scenario.cluster.behaviours
            and scenario.nemeses
            and scenario.faults.drop
        ):
            found.append(seed)
        if len(found) == count:
            return found
    raise AssertionError(f"fewer than {count} such seeds on {size} nodes")


def test_large_clusters_keep_the_invariants_under_faults() -> None:
    """Seeded fault scenarios (equivocators, partitions, kills, a lossy network) on
    50 and 25 nodes keep every invariant (run side by side, as the seeds are)."""
    cases: list[Case] = [(seed, 50) for seed in _faulty_seeds(50, 1)]
    cases += [(seed, 25) for seed in _faulty_seeds(25, 2)]
    outcomes = run_seeds(cases, WORKERS)
    for outcome in outcomes:
        print(json.dumps(attrs.asdict(outcome)))
    failures = [o.report for o in outcomes if o.report is not None]
    assert not failures, "\n\n".join(failures)
