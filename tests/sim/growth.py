"""How the work per round grows with the cluster: 3 to 50 real nodes in the simulator.

Calm network (2 ms latency). Every peer link pulls once as it starts and then every
ANTI_ENTROPY_INTERVAL (3 s), all at the same moments here, since all start at once; so
the ROUNDS rounds (started at node_001, ROUND_GAP apart) run between the start-up pulls
and the first periodic ones, and what they cost is counted there: gossip requests and
bytes, signatures made and verified, and the simulated cluster's CPU (every node's work
and the simulator's, on one core). Anti-entropy, a cost per second whatever the rounds,
is counted over the next full interval, which starts with one more round as every link
pulls: the pull wave's own gossip is counted too. (A pull's bytes grow with the rounds
held, up to 100; here there are four.) test_growth prints the rows as JSON (docs/benchmarks.md has the table) and asserts
on the counts, which are deterministic, never on time.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import trio

from anna_trio import crypto
from anna_trio.consensus import COMPLETE
from anna_trio.peers import ANTI_ENTROPY_INTERVAL

from .cluster import Cluster, ClusterSpec, json_body
from .network import Faults
from .runner import run_script

ROUNDS = 3
ROUND_GAP = 0.6
FIRST_ROUND = 1.0


class Calls:
    """Counts calls of a crypto function as the node makes them (crypto.X), while
    counting; the function is back as it was after."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[Calls]:
        real = getattr(crypto, self.name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        setattr(crypto, self.name, counted)
        try:
            yield self
        finally:
            setattr(crypto, self.name, real)


def measure_growth(size: int) -> dict[str, Any]:
    """One size's row (see the module docstring); runs in a worker process."""
    with (
        Calls("verify_observation").counting() as verified,
        Calls("sign_observation").counting() as signed,
    ):
        return _measure(size, verified, signed)


def _measure(size: int, verified: Calls, signed: Calls) -> dict[str, Any]:
    row: dict[str, Any] = {"nodes": size}

    async def script(cluster: Cluster) -> None:
        network = cluster.network
        await trio.sleep_until(FIRST_ROUND)
        requests, sent = collections.Counter(network.requests), collections.Counter(network.bytes)
        verified.count = signed.count = 0
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
            signatures_per_round=signed.count / ROUNDS,
            verifications_per_round=round(verified.count / ROUNDS, 1),
            verifications_per_observation=round(verified.count / (ROUNDS * size * (size - 1)), 2),
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
