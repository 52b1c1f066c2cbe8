"""The cluster simulator (`nox -s sim`): thousands of seeded runs with their invariants,
same seed → same run byte for byte, a reintroduced bug it must catch, and the
restart wiring of issue 15.

ANNA_SIM_SEEDS (default 2000) sets how many seeds run, ANNA_SIM_WORKERS (default: the
CPU count) over how many processes; ANNA_SIM_SEED=N runs seed N alone, in this process
(on ANNA_SIM_SIZE nodes if set: the large clusters' replays), and with
ANNA_SIM_TRACE=DIR writes its full trace there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import attrs
import pytest
import trio

from anna_trio.crypto import observation_digest
from anna_trio.own import OwnObservations
from anna_trio.peers import ANTI_ENTROPY_INTERVAL

from .cluster import Cluster, ClusterSpec, json_body
from .invariants import converged, node_state
from .network import Faults
from .runner import (
    SEED_ENV,
    SIZE_ENV,
    TRACE_ENV,
    Case,
    SimResult,
    run_script,
    run_seed,
    run_seeds,
)
from .scenario import scenario_for

SEEDS = int(os.environ.get("ANNA_SIM_SEEDS", "2000"))
WORKERS = int(os.environ.get("ANNA_SIM_WORKERS", str(os.cpu_count() or 1)))


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


LARGE = ((50, 1), (25, 2))  # (cluster size, how many seeds)


def test_seeds() -> None:
    """Every seed keeps every invariant: SEEDS of 3-7 nodes, and a few fault scenarios
    on 25 and 50 nodes (first, being the longest). A failure names each broken
    invariant, with the line that replays the seed."""
    chosen = os.environ.get(SEED_ENV)
    if chosen is not None:
        size = os.environ.get(SIZE_ENV)
        result = run_seed(int(chosen), size=int(size) if size else None)
        if os.environ.get(TRACE_ENV):
            path = Path(os.environ[TRACE_ENV]) / f"sim-seed-{chosen}.trace"
            result.trace.write(path)
            print(f"trace of seed {chosen}: {path} ({len(result.trace.lines)} lines)")
        print(
            json.dumps(
                {"seed": int(chosen), "scenario": result.scenario.describe(), **result.stats}
            )
        )
        assert not result.violations, result.report()
        return
    started = time.monotonic()
    large: list[Case] = [(seed, n) for n, count in LARGE for seed in _faulty_seeds(n, count)]
    every = run_seeds([*large, *((seed, None) for seed in range(SEEDS))], WORKERS)
    elapsed = time.monotonic() - started
    for outcome in every[: len(large)]:
        print(json.dumps(attrs.asdict(outcome)))
    seeds = every[len(large) :]
    print(
        json.dumps(
            {
                "seeds": len(seeds),
                "workers": WORKERS,
                "wall_seconds": round(elapsed, 1),
                "seeds_per_second": round(len(seeds) / elapsed, 2),
                "cpu_seconds_per_seed": round(sum(o.cpu_seconds for o in seeds) / len(seeds), 3),
                "requests": sum(o.requests for o in seeds),
                "rounds": sum(o.rounds for o in seeds),
                "outages": dict(sum((Counter(o.outages) for o in seeds), Counter())),
                "equivocators_marked": sum(o.equivocators_marked for o in seeds),
                "by_size": {
                    n: sum(1 for o in seeds if o.size == n) for n in sorted({o.size for o in seeds})
                },
            }
        )
    )
    failures = [o.report for o in every if o.report is not None]
    assert not failures, f"{len(failures)} of {len(every)} runs failed:\n\n" + "\n\n".join(
        failures[:10]
    )


def _busy_seed() -> SimResult:
    """The first seed whose run has Byzantine equivocation caught, a kill -9 or power
    cut, and a network that loses and duplicates messages."""
    for seed in range(1000):
        scenario = scenario_for(seed)
        if not (
            "equivocate" in scenario.cluster.behaviours
            and {"kill", "power-cut"} & set(scenario.nemeses)
            and scenario.faults.drop
            and scenario.faults.duplicate
        ):
            continue
        result = run_seed(seed)
        if result.stats["equivocators_marked"] and {"kills", "power cuts"} & set(
            result.stats["outages"]
        ):
            return result
    raise AssertionError("no busy seed among the first 1000")


def test_same_seed_same_run_byte_for_byte() -> None:
    """Two runs of a seed give the same trace — every message and its answer, every
    fault, nemesis event and log line — byte for byte, here and in a fresh process
    (the replay line's promise); another seed gives another trace."""
    first = _busy_seed()
    seed = first.seed
    second = run_seed(seed)
    kinds = {line.split(" ", 2)[1] for line in first.trace.lines}
    assert {"send", "answer", "nemesis", "log"} <= kinds, kinds
    assert kinds & {"drop", "duplicate", "lose-answer", "reset", "cut"}, kinds
    assert first.trace.lines == second.trace.lines
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from sim.runner import run_seed; "
        "print(run_seed(int(sys.argv[2])).trace.digest())"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parents[1]), str(seed)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")},
    )
    assert fresh.stdout.strip() == first.trace.digest()
    assert run_seed(seed + 1).trace.digest() != first.trace.digest()


def test_a_node_that_signs_again_after_a_restart_is_caught_with_its_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reintroduce a known bug — a restarted node ignores its stored own observations
    and signs the round again — and the seeds with restarts report it: the broken
    invariants by name, the seed, and the replay line."""

    def forgetful_restore(self: OwnObservations, signed: object, on_disk_through: str) -> None:
        """As if the sign-state were not kept: nothing restored, nothing on disk."""

    monkeypatch.setattr(OwnObservations, "restore", forgetful_restore)
    restarting = [s for s in range(200) if {"kill", "power-cut"} & set(scenario_for(s).nemeses)]
    for seed in restarting[:40]:
        result = run_seed(seed)
        if result.violations:
            break
    else:
        raise AssertionError(f"the bug went unseen in seeds {restarting[:40]}")
    broken = {v.invariant for v in result.violations}
    assert broken & {"sign-once", "honest-flagged"}, result.report()
    report = result.report()
    assert f"simulation seed {seed} broke" in report
    assert f"ANNA_SIM_SEED={seed} nox -s sim" in report


ROUND = "round_0001"


def test_a_restarted_node_resends_its_restored_observation_without_a_pull() -> None:
    """Issue 15's wiring: a node whose observation exists only in its own store is
    restarted among live peers; they get it through /rpc/gossip at once — anti-entropy
    (/rpc/sync) is cut off for the whole test, so no pull can have carried it."""

    async def script(cluster: Cluster) -> None:
        network = cluster.network
        network.blocked_paths.add("/rpc/sync")
        network.partition(frozenset({"node_003"}), frozenset({"node_001", "node_002"}))
        with trio.fail_after(1.0):
            answer = await cluster.ask(
                "node_003", "POST", "/rpc/round/start", json_body({"round_id": ROUND})
            )
        assert answer is not None and answer.status == 202
        node = cluster.running_nodes()["node_003"]
        with trio.fail_after(1.0):
            while (own := node.engine.observation_of(ROUND, "node_003")) is None:  # noqa: ASYNC110
                await trio.sleep(0.01)
        await cluster.kill("node_003")  # its outbox, never delivered, dies with it
        network.heal()
        peers = cluster.running_nodes(["node_001", "node_002"])
        assert all(peer.engine.round(ROUND) is None for peer in peers.values())
        await cluster.start("node_003")
        restarted = trio.current_time()
        with trio.fail_after(1.0):
            while not all(  # noqa: ASYNC110 - engine state has no event to wait on
                (held := peer.engine.observation_of(ROUND, "node_003")) is not None
                and observation_digest(held) == observation_digest(own)
                for peer in peers.values()
            ):
                await trio.sleep(0.01)
        cluster.trace.add(
            "test", f"peers hold it {trio.current_time() - restarted:.3f}s after the restart"
        )

    trace = run_script(ClusterSpec(size=3), script, faults=Faults(latency=0.002))
    restart = max(i for i, line in enumerate(trace.lines) if "node_003#1 starts" in line)
    pushes = [
        line
        for line in trace.lines[restart:]
        if " send " in line and "node_003>node_00" in line and "/rpc/gossip" in line
    ]
    assert {line.split()[3].split(">")[1] for line in pushes if '"node_id":"node_003"' in line} == {
        "node_001",
        "node_002",
    }


def test_an_equivocation_no_honest_node_saw_both_halves_of_still_converges() -> None:
    """Regression, seeds 216 and 478 of the first scenario generator: a Byzantine node
    starts a round and gives each peer one of two observations, so no honest node sees
    both; anti-entropy must still bring them together (each honest node marks it, all
    agree on the result) instead of leaving each with the half it was given."""
    spec = ClusterSpec(
        size=4, byzantine=frozenset({"node_004"}), behaviours=frozenset({"equivocate"})
    )

    async def script(cluster: Cluster) -> None:
        with trio.fail_after(1.0):
            answer = await cluster.ask(
                "node_004", "POST", "/rpc/round/start", json_body({"round_id": ROUND})
            )
        assert answer is not None and answer.status == 202
        await trio.sleep(spec.round_timeout + 4 * ANTI_ENTROPY_INTERVAL)
        nodes = cluster.running_nodes()
        assert converged(nodes), {n: node_state(node) for n, node in nodes.items()}
        assert all("node_004" in node.engine.byzantine for node in nodes.values())

    run_script(spec, script, faults=Faults(latency=0.002))
