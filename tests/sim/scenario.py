"""What a seed means: the cluster, the faults, and the actors that inject them.

`scenario_for(seed)` draws everything from the seed: 3–7 validators (up to a third of
them, rounded down, Byzantine), the round timeout, interval or operator-started
rounds, the network's fault rates, which nemeses run (partitions, one-way cuts,
kill -9, power cuts, clean restarts) and how often. A run has a fault phase, then a
heal (calm network, every node up, no new rounds) and a settle phase.
"""

from __future__ import annotations

import random

import attrs
import trio

from .cluster import CLIENT_TIMEOUT, Cluster, ClusterSpec, json_body
from .network import Faults

NEMESES = ("partition", "one-way", "heal", "kill", "power-cut", "restart")
BEHAVIOURS = ("equivocate", "replay", "garbage")
UNSYNCED_WAIT = 1.0  # a power cut waits this long at most for a commit in flight
RECONCILE_TIMEOUT = 5.0  # a reconcile pulls from every peer: more than one request's wait


@attrs.frozen
class Scenario:
    seed: int
    cluster: ClusterSpec
    faults: Faults
    fault_time: float  # seconds of faults before the heal
    nemeses: tuple[str, ...] = ()
    nemesis_rate: float = 0.0  # nemesis events per second
    max_down: int = 1  # nodes down at once
    round_rate: float = 1.0  # operator round starts (and reconciles, status reads) per second
    settle_max: float = 40.0  # the heal must converge within this

    def describe(self) -> str:
        spec = self.cluster
        parts = [
            f"{spec.size} nodes",
            f"quorum {spec.quorum_rule}",
            f"round timeout {spec.round_timeout}",
        ]
        if spec.byzantine:
            parts.append(
                f"Byzantine {','.join(sorted(spec.byzantine))} ({'+'.join(sorted(spec.behaviours))})"
            )
        parts.append(
            f"interval rounds every {spec.interval}s" if spec.interval else "operator rounds"
        )
        if self.nemeses:
            parts.append(f"nemeses {'+'.join(self.nemeses)} at {self.nemesis_rate}/s")
        faults = {k: v for k, v in attrs.asdict(self.faults).items() if v and k != "slow_max"}
        parts.append(f"network {faults}")
        parts.append(f"{self.fault_time}s of faults")
        return "; ".join(parts)


def scenario_for(seed: int, *, size: int | None = None) -> Scenario:
    rng = random.Random(f"scenario|{seed}")
    size = size or rng.randint(3, 7)
    node_ids = [f"node_{i:03d}" for i in range(1, size + 1)]
    most_byzantine = (size - 1) // 3
    byzantine: frozenset[str] = frozenset()
    behaviours: frozenset[str] = frozenset()
    if most_byzantine and rng.random() < 0.6:
        byzantine = frozenset(rng.sample(node_ids, rng.randint(1, most_byzantine)))
        behaviours = frozenset(b for b in BEHAVIOURS if rng.random() < 0.6) or frozenset(
            {"equivocate"}
        )
    round_timeout = rng.choice((0.5, 1.0, 1.5, 2.0))
    calm = rng.random() < 0.1
    faults = Faults(
        latency=rng.choice((0.0005, 0.002, 0.01, 0.05)),
        slow=0.0 if calm else rng.choice((0.0, 0.0, 0.01, 0.05)),
        drop=0.0 if calm else rng.choice((0.0, 0.0, 0.02, 0.1)),
        reset=0.0 if calm else rng.choice((0.0, 0.02, 0.05)),
        lose_answer=0.0 if calm else rng.choice((0.0, 0.02, 0.05)),
        duplicate=0.0 if calm else rng.choice((0.0, 0.02, 0.1)),
    )
    nemeses = () if calm else tuple(n for n in NEMESES if rng.random() < 0.5)
    interval = rng.choice((0.0, 0.0, 1.0, 2.5))
    return Scenario(
        seed=seed,
        cluster=ClusterSpec(
            size=size,
            byzantine=byzantine,
            behaviours=behaviours,
            quorum_rule=rng.choice(("majority", "majority", "two_thirds")),
            round_timeout=round_timeout,
            interval=interval,
            disk_latency=rng.choice((0.0, 0.001, 0.005, 0.02)),
            observer_slow=rng.choice((0.0, 0.0, 0.1)),
            observer_absent=rng.choice((0.0, 0.0, 0.05)),
            clock_skew=rng.choice((0.0, 0.05, 0.5)),
        ),
        faults=faults,
        fault_time=rng.uniform(0.5, 1.5),
        nemeses=nemeses,
        nemesis_rate=rng.choice((0.5, 1.0, 2.0)) if nemeses else 0.0,
        max_down=rng.randint(1, max(1, (size - 1) // 2)),
        round_rate=0.3 if interval else rng.choice((0.5, 1.0, 2.0)),
    )


async def nemesis(cluster: Cluster, scenario: Scenario, rng: random.Random) -> None:
    """Partitions, one-way cuts, heals, kills, power cuts and clean restarts, until
    cancelled; a node taken down comes back after a seeded downtime."""
    if not scenario.nemeses:
        return
    network, ids = cluster.network, cluster.spec.node_ids
    async with trio.open_nursery() as outages:
        while True:
            await trio.sleep(rng.expovariate(scenario.nemesis_rate))
            kind = rng.choice(scenario.nemeses)
            if kind == "partition":
                side = frozenset(rng.sample(ids, rng.randint(1, len(ids) - 1)))
                network.heal()
                network.partition(side, frozenset(ids) - side)
                cluster.trace.add("nemesis", f"partition {sorted(side)} | rest")
            elif kind == "one-way":
                source, target = rng.sample(ids, 2)
                network.cut(source, target)
                cluster.trace.add("nemesis", f"cut {source}->{target}")
            elif kind == "heal":
                network.heal()
                cluster.trace.add("nemesis", "partitions healed")
            else:
                up = [n for n in ids if cluster.nodes[n].running is not None]
                if len(ids) - len(up) < scenario.max_down:
                    outages.start_soon(
                        _outage, cluster, rng.choice(up), kind, rng.uniform(0.05, 3.0)
                    )


async def _outage(cluster: Cluster, node_id: str, kind: str, downtime: float) -> None:
    """A clean restart, a kill -9, or a power cut — timed, when it can be, for a moment
    the node's disk holds a commit not yet synced."""
    if kind == "restart":
        await cluster.stop(node_id)
    elif kind == "kill":
        await cluster.kill(node_id)
    else:
        with trio.move_on_after(UNSYNCED_WAIT):
            await cluster.nodes[node_id].media.wait_unsynced()
        await cluster.kill(node_id, power_cut=True)
    await trio.sleep(downtime)
    await cluster.start(node_id)


async def operator(cluster: Cluster, scenario: Scenario, rng: random.Random) -> None:
    """An outside client: round starts (some with an Idempotency-Key, retried on the
    same node when unanswered), reconciles and status reads at honest nodes. Its first
    act is a round start, so no run goes without a round."""
    honest, serial, first = cluster.spec.honest, 0, True
    while True:
        if not first:
            await trio.sleep(rng.expovariate(scenario.round_rate))
        roll, target = (1.0 if first else rng.random()), rng.choice(honest)
        first = False
        if roll < 0.1:
            with trio.move_on_after(RECONCILE_TIMEOUT):
                await cluster.ask(target, "POST", "/rpc/reconcile")
        elif roll < 0.2:
            with trio.move_on_after(CLIENT_TIMEOUT):
                await cluster.ask(target, "GET", "/rpc/status")
        elif not scenario.cluster.interval or roll < 0.3:
            serial += 1
            payload = {"round_id": f"round_{serial:04d}"} if rng.random() < 0.9 else {}
            key = {"idempotency-key": f"start-{serial}"} if rng.random() < 0.3 else None
            await _start_round(cluster, rng, target, json_body(payload), key)


async def _start_round(
    cluster: Cluster, rng: random.Random, target: str, body: bytes, key: dict[str, str] | None
) -> None:
    """Without a key, up to three tries at random honest nodes until one answers 202.
    With one, three sends to the same node, whose 202 answers must all be the first."""
    answers: list[bytes] = []
    for _ in range(3):
        response = None
        with trio.move_on_after(CLIENT_TIMEOUT):
            response = await cluster.ask(target, "POST", "/rpc/round/start", body, headers=key)
        if response is not None and response.status == 202:
            answers.append(response.body)
            if key is None:
                return
        elif key is None:
            target = rng.choice(cluster.spec.honest)
    if len(set(answers)) > 1:
        cluster.checker.violate(
            "idempotency", f"{target} answered one Idempotency-Key {key} with {answers}"
        )
