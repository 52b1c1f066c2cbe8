"""Run one seed: its scenario on a fresh cluster, in one `trio.run` on
MockClock(autojump_threshold=0), with every source of randomness seeded.

Same seed, same run, byte for byte — given the same PYTHONHASHSEED (set and frozenset
iteration orders follow it; the nox sessions pin it to 0, and the replay line says so).
A failing seed's report names each violated invariant and a one-line replay command.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio
import trio.testing

from .byzantine import Archive, make_mischief
from .cluster import Cluster, ClusterSpec
from .invariants import Violation, converged
from .network import Faults
from .scenario import Scenario, nemesis, operator, scenario_for
from .trace import Trace

T = TypeVar("T")
R = TypeVar("R")

SEED_ENV = "ANNA_SIM_SEED"
SIZE_ENV = "ANNA_SIM_SIZE"  # with the seed: its scenario on this many nodes
TRACE_ENV = "ANNA_SIM_TRACE"
CHECK_PERIOD = 1.0
SETTLE_POLL = 0.25


def replay_command(seed: int, size: int | None = None) -> str:
    line = f"{SEED_ENV}={seed} nox -s sim"
    if size is not None:
        line = f"{SIZE_ENV}={size} {line}"
    hash_seed = os.environ.get("PYTHONHASHSEED")
    if hash_seed != "0":  # nox pins it to 0; a run without it replays only with its own
        line += f"  (this run had PYTHONHASHSEED={hash_seed or 'unset, random'})"
    return line


@contextlib.contextmanager
def seeded_scheduler(seed: int) -> Iterator[None]:
    """Make Trio's scheduling a function of the seed.

    Each scheduler pass runs the ready tasks in an order Trio shuffles with a module
    RNG of its own, `trio._core._run._r`, seeded from the OS: a private name, and the
    only handle there is. Trio's Hypothesis plugin seeds it the same way and sets
    `_ALLOW_DETERMINISTIC_SCHEDULING`, which sorts each batch by task creation before
    the shuffle (tasks wake from sets ordered by memory address otherwise)."""
    run: Any = trio._core._run
    saved = run._ALLOW_DETERMINISTIC_SCHEDULING, run._r.getstate()
    # A Final in trio, so not assignable by name for the type checker.
    setattr(run, "_ALLOW_DETERMINISTIC_SCHEDULING", True)  # noqa: B010
    run._r.seed(seed)
    try:
        yield
    finally:
        setattr(run, "_ALLOW_DETERMINISTIC_SCHEDULING", saved[0])  # noqa: B010
        run._r.setstate(saved[1])


def _scratch_dir() -> str | None:
    """/dev/shm where there is one: the audit logs are real files, fsynced per entry,
    and a directory fsync on a disk costs milliseconds."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@attrs.frozen
class SimResult:
    scenario: Scenario
    violations: tuple[Violation, ...]
    trace: Trace
    stats: dict[str, Any]
    replay: str

    @property
    def seed(self) -> int:
        return self.scenario.seed

    def report(self) -> str:
        lines = [
            f"simulation seed {self.seed} broke {len(self.violations)} invariant(s) "
            f"[{self.scenario.describe()}]:",
            *(f"  {violation}" for violation in self.violations),
            f"replay: {self.replay}",
        ]
        return "\n".join(lines)


def run_seed(
    seed: int,
    *,
    size: int | None = None,
    scenario: Scenario | None = None,
    trace_bodies: bool = True,
) -> SimResult:
    """Simulate `scenario` (by default the seed's, on `size` nodes if given) and check
    every invariant."""
    scenario = scenario or scenario_for(seed, size=size)
    trace = Trace()
    stats: dict[str, Any] = {}
    violations: list[Violation] = []
    with (
        seeded_scheduler(seed),
        trace.capturing_logs(),
        tempfile.TemporaryDirectory(prefix="anna-sim-", dir=_scratch_dir()) as directory,
    ):
        try:
            trio.run(
                partial(
                    simulate, scenario, trace, Path(directory), violations, stats, trace_bodies
                ),
                clock=trio.testing.MockClock(autojump_threshold=0),
            )
        except Exception as exc:  # a node or the simulator died: report it with the seed
            text = "".join(traceback.format_exception(exc))
            trace.add("crash", text)
            violations.append(Violation("crash", "\n".join(text.splitlines()[-25:]), -1.0))
    return SimResult(scenario, tuple(violations), trace, stats, replay_command(seed, size))


async def simulate(
    scenario: Scenario,
    trace: Trace,
    directory: Path,
    violations: list[Violation],
    stats: dict[str, Any],
    trace_bodies: bool = True,
) -> None:
    """Faults, heal, settle, check."""
    cluster = Cluster(
        scenario.cluster,
        seed=scenario.seed,
        trace=trace,
        directory=directory,
        trace_bodies=trace_bodies,
    )
    archive = Archive()
    cluster.network.watchers.append(archive)
    cluster.network.faults = scenario.faults
    trace.add("scenario", scenario.describe())
    async with cluster.running():
        async with trio.open_nursery() as watch:
            watch.start_soon(_check_periodically, cluster)
            with trio.move_on_after(scenario.fault_time):
                async with trio.open_nursery() as actors:
                    actors.start_soon(nemesis, cluster, scenario, cluster.rng("nemesis"))
                    actors.start_soon(operator, cluster, scenario, cluster.rng("operator"))
                    for node_id in sorted(scenario.cluster.byzantine):
                        actors.start_soon(
                            make_mischief,
                            scenario.cluster.behaviours,
                            [n for n in cluster.spec.node_ids if n != node_id],
                            archive,
                            cluster.rng(f"mischief|{node_id}"),
                            partial(cluster.sender, node_id),
                            cluster.send_as,
                        )
            cluster.stop_rounds()
            healed_at = trio.current_time()
            await cluster.heal()
            settled = await _settle(cluster, scenario.settle_max)
            stats["settle_time"] = trio.current_time() - healed_at
            watch.cancel_scope.cancel()
        nodes = cluster.running_nodes()
        cluster.checker.finish(
            nodes,
            {n: cluster.nodes[n].audit_log for n in nodes},
            {n: cluster.nodes[n].handed_out for n in nodes},
        )
        if not settled and not cluster.checker.violations:
            cluster.checker.violate(
                "diverged", f"not settled {scenario.settle_max}s after the heal"
            )
        stats.update(
            virtual_time=trio.current_time(),
            rounds=len(next(iter(nodes.values())).engine.round_ids()),
            requests=dict(cluster.network.requests),
            bytes=dict(cluster.network.bytes),
            outages=dict(cluster.outages),
            equivocators_marked=sum(
                1
                for node in nodes.values()
                for record in node.engine.byzantine.values()
                if record.node_id in cluster.spec.byzantine
            ),
        )
    violations.extend(cluster.checker.violations)


async def _check_periodically(cluster: Cluster) -> None:
    while True:
        await trio.sleep(CHECK_PERIOD)
        cluster.checker.check_nodes(cluster.running_nodes())


async def _settle(cluster: Cluster, limit: float) -> bool:
    """Until the honest nodes agree and no round is open; False after `limit` seconds."""
    with trio.move_on_after(limit):
        while not converged(cluster.running_nodes()):  # noqa: ASYNC110 - engine state has no event
            await trio.sleep(SETTLE_POLL)
        return True
    return False


@attrs.frozen
class Outcome:
    """What a worker process reports of one seed."""

    seed: int
    size: int
    report: str | None
    cpu_seconds: float
    requests: int
    rounds: int
    outages: dict[str, int]
    equivocators_marked: int


Case = tuple[int, int | None]
"""A seed, and the cluster size to run its scenario on (None: the seed's own)."""


def outcome_of(case: Case) -> Outcome:
    """One seed's run in a worker: its report, not its trace (bodies left out of it)."""
    seed, size = case
    started = time.process_time()
    result = run_seed(seed, size=size, trace_bodies=False)
    return Outcome(
        seed=seed,
        size=result.scenario.cluster.size,
        report=result.report() if result.violations else None,
        cpu_seconds=time.process_time() - started,
        requests=sum(result.stats.get("requests", {}).values()),
        rounds=result.stats.get("rounds", 0),
        outages=result.stats.get("outages", {}),
        equivocators_marked=result.stats.get("equivocators_marked", 0),
    )


def in_workers(work: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """`work` on every item, spread over `workers` processes (spawned: no state shared
    with this one; every run seeds its own Trio scheduler), answers in order. Items are
    handed out in order, a few at a time: put the long ones first."""
    if workers <= 1:
        return [work(item) for item in items]
    context = multiprocessing.get_context("spawn")
    chunks = max(1, len(items) // (workers * 40))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(work, items, chunksize=chunks))


def run_seeds(cases: Sequence[Case], workers: int) -> list[Outcome]:
    return in_workers(outcome_of, cases, workers)


def run_script(
    spec: ClusterSpec,
    script: Callable[[Cluster], Awaitable[None]],
    *,
    seed: int = 0,
    faults: Faults | None = None,
    trace_bodies: bool = True,
) -> Trace:
    """A hand-written run: `script` drives a started cluster (and asserts); the trace
    comes back. Deterministic like a seed's run."""
    trace = Trace()

    async def main(directory: Path) -> None:
        cluster = Cluster(
            spec, seed=seed, trace=trace, directory=directory, trace_bodies=trace_bodies
        )
        cluster.network.faults = faults or Faults()
        async with cluster.running():
            await script(cluster)

    with (
        seeded_scheduler(seed),
        trace.capturing_logs(),
        tempfile.TemporaryDirectory(prefix="anna-sim-", dir=_scratch_dir()) as directory,
    ):
        trio.run(main, Path(directory), clock=trio.testing.MockClock(autojump_threshold=0))
    return trace
