"""N real nodes in one Trio process, wired as the daemon wires them.

Each node is a `SimNode`: what outlives its processes (its key, the database media,
its audit log file, its audit_id reservation) and the process running now. A process
is the daemon's `_run_with` and `_serve` with the fakes in: allocator → audit log →
store on the seeded disk → outbox → Node → restore → `daemon_start` → peer supervisor
on the simulated network → RpcServer behind the network's endpoint; the writer outlives
the node, the node outlives the links. `kill` is kill -9 (optionally followed by a
power cut), `stop` the SIGTERM path.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from anna_trio import __version__, crypto
from anna_trio._exceptions import PeerError
from anna_trio.audit import AuditLog
from anna_trio.coordinator import RoundCoordinator
from anna_trio.metrics import Metrics
from anna_trio.models import ClusterConfig, PeerConfig
from anna_trio.node import Node
from anna_trio.outbox import PeerOutbox
from anna_trio.peers import PeerSupervisor
from anna_trio.rpc.server import RpcServer
from anna_trio.store import Store
from anna_trio.transport import client
from anna_trio.wire import Batch, IngestCounts, SyncRequest

from .byzantine import Equivocator
from .disk import Media, MountedDisk
from .fakes import RecordingAllocator, SimClock, SimObserver, SimReservation, node_key
from .invariants import Checker
from .network import Endpoint, Network, Sender
from .process import Process, current_node
from .trace import Trace

SHUTDOWN_GRACE = 5.0  # as the daemon's
OPERATOR = Sender("operator", "10.0.9.1")
CLIENT_TIMEOUT = 2.0  # how long outside clients wait for an answer
JSON_HEADERS = {"content-type": "application/json"}

_metrics: dict[str, Metrics] = {}


def metrics_for(node_id: str) -> Metrics:
    """One registry per node id for the whole test process: building one reads /proc
    (about 3 ms, more than a short seed's rounds), and the node only writes to it."""
    if node_id not in _metrics:
        _metrics[node_id] = Metrics(node_id)
    return _metrics[node_id]


@attrs.frozen
class ClusterSpec:
    """The cluster a run simulates."""

    size: int
    byzantine: frozenset[str] = frozenset()
    behaviours: frozenset[str] = frozenset()  # of the Byzantine nodes: equivocate, replay, garbage
    quorum_rule: str = "majority"
    round_timeout: float = 2.0
    interval: float = 0.0  # > 0: every node's coordinator starts a round per interval
    disk_latency: float = 0.002  # fsync takes up to this long
    observer_slow: float = 0.0  # chance a measurement takes up to a round timeout
    observer_absent: float = 0.0  # chance the observer has nothing for a round
    clock_skew: float = 0.0  # each node's wall clock is off by up to this
    retain_rounds: int = 1000

    @property
    def node_ids(self) -> list[str]:
        return [f"node_{i:03d}" for i in range(1, self.size + 1)]

    @property
    def honest(self) -> list[str]:
        return [n for n in self.node_ids if n not in self.byzantine]


class WatchedInbox:
    """peers.Inbox: the node as its links see it, telling the checker what each
    answer it ingested carried."""

    def __init__(self, node: Node, process: Process, checker: Checker) -> None:
        self.node_id = node.node_id
        self._node = node
        self._process = process
        self._checker = checker

    async def ingest(self, batch: Batch) -> IngestCounts:
        counts = await self._node.ingest(batch)
        if self._process.alive:
            self._checker.ingested(self.node_id, batch)
        return counts

    def sync_request(self) -> SyncRequest:
        return self._node.sync_request()


class Incarnation:
    """A running process of a node and its parts."""

    def __init__(self, process: Process, node: Node, supervisor: PeerSupervisor) -> None:
        self.process = process
        self.node = node
        self.supervisor = supervisor
        self.scope = trio.CancelScope()
        self.rounds = trio.CancelScope()  # the interval coordinator
        self.stop_requested = trio.Event()
        self.ended = trio.Event()


class SimNode:
    """One validator: what outlives its processes, and the process running now."""

    def __init__(
        self, node_id: str, index: int, media: Media, audit_log: Path, skew: float
    ) -> None:
        self.node_id = node_id
        self.address = f"10.0.0.{index}"
        self.media = media
        self.audit_log = audit_log
        self.clock = SimClock(skew)
        self.reservation = SimReservation(node_id)
        self.handed_out: list[int] = []
        self.processes = 0
        self.running: Incarnation | None = None


class Cluster:
    """The nodes, the network between them, the checker watching both."""

    def __init__(
        self,
        spec: ClusterSpec,
        *,
        seed: int,
        trace: Trace,
        directory: Path,
        trace_bodies: bool = True,
    ) -> None:
        self.spec = spec
        self.trace = trace
        self._seed = seed
        skews = self.rng("clock")
        self.nodes = {
            node_id: SimNode(
                node_id,
                index,
                Media(self.rng(f"media|{node_id}")),
                directory / f"{node_id}.audit.jsonl",
                skews.uniform(-spec.clock_skew, spec.clock_skew),
            )
            for index, node_id in enumerate(spec.node_ids, 1)
        }
        self.config = ClusterConfig(
            peers=tuple(
                PeerConfig(n.node_id, n.address, 8000, crypto.public_key_hex(node_key(n.node_id)))
                for n in self.nodes.values()
            ),
            allow_insecure_peers=True,
            quorum_rule=spec.quorum_rule,
        )
        self._validator_addresses = frozenset(n.address for n in self.nodes.values())
        self.network = Network(self.rng("network"), trace, trace_bodies=trace_bodies)
        self.checker = Checker(self.config, spec.honest)
        self.network.watchers.append(self.checker)
        if "equivocate" in spec.behaviours:
            for node_id in sorted(spec.byzantine):
                peers = [n for n in spec.node_ids if n != node_id]
                self.network.tamperers[node_id] = Equivocator(
                    node_id, node_key(node_id), peers, self.rng(f"equivocate|{node_id}")
                )
        self._rounds_on = spec.interval > 0
        self._nursery: trio.Nursery | None = None
        self.outages: collections.Counter[str] = collections.Counter()  # kills, power cuts…

    def rng(self, stream: str) -> random.Random:
        """An independent seeded stream (str seeds hash with SHA-512, not hash())."""
        return random.Random(f"{self._seed}|{stream}")

    # --- lifecycle --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Cluster]:
        """Every node started; everything cancelled and closed on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for node_id in self.nodes:
                    await self.start(node_id)
                yield self
                for sim_node in self.nodes.values():  # the end: as if the power went
                    if sim_node.running is not None:
                        sim_node.running.process.kill()
                nursery.cancel_scope.cancel()
        finally:
            for sim_node in self.nodes.values():
                sim_node.media.close()

    def sender(self, node_id: str) -> Sender | None:
        """The node's running process as a sender, None while it is down."""
        sim_node = self.nodes[node_id]
        if sim_node.running is None:
            return None
        return Sender(node_id, sim_node.address, sim_node.running.process)

    def running_nodes(self, ids: Iterable[str] | None = None) -> dict[str, Node]:
        wanted = self.spec.honest if ids is None else ids
        return {
            node_id: running.node
            for node_id in wanted
            if (running := self.nodes[node_id].running) is not None
        }

    async def start(self, node_id: str) -> None:
        sim_node = self.nodes[node_id]
        if sim_node.running is None:
            assert self._nursery is not None
            sim_node.running = await self._nursery.start(self._process, sim_node)

    async def kill(self, node_id: str, *, power_cut: bool = False) -> None:
        """kill -9, then (optionally) a power cut before anything restarts it."""
        sim_node = self.nodes[node_id]
        running = sim_node.running
        if running is None:
            return
        running.process.kill()
        self.network.close(node_id)
        running.scope.cancel()
        with trio.CancelScope(shield=True):
            await running.ended.wait()
        sim_node.running = None
        lost = sim_node.media.power_cut() if power_cut else 0
        self.outages["power cuts" if power_cut else "kills"] += 1
        self.outages["transactions lost"] += lost
        what = f"power cut: {lost} unsynced transactions lost" if power_cut else "kill -9"
        self.trace.add("nemesis", f"{running.process!r} {what}")

    async def stop(self, node_id: str) -> None:
        """SIGTERM: drain in-flight requests, daemon_stop, give back reserved ids."""
        sim_node = self.nodes[node_id]
        running = sim_node.running
        if running is None:
            return
        running.stop_requested.set()
        with trio.CancelScope(shield=True):
            await running.ended.wait()
        sim_node.running = None
        self.outages["clean restarts"] += 1
        self.trace.add("nemesis", f"{running.process!r} stopped")

    def stop_rounds(self) -> None:
        """No more interval rounds, in running processes or restarted ones."""
        self._rounds_on = False
        for sim_node in self.nodes.values():
            if sim_node.running is not None:
                sim_node.running.rounds.cancel()

    async def heal(self) -> None:
        """The end of the faults: a calm network, no partitions, every node up."""
        self.network.faults = self.network.faults.calm()
        self.network.heal()
        self.trace.add("nemesis", "heal")
        for node_id in self.nodes:
            await self.start(node_id)

    async def _process(
        self, sim_node: SimNode, *, task_status: trio.TaskStatus[Incarnation]
    ) -> None:
        spec, node_id = self.spec, sim_node.node_id
        process = Process(node_id, sim_node.processes)
        sim_node.processes += 1
        current_node.set(node_id)
        self.trace.add("nemesis", f"{process!r} starts")
        rng = self.rng(repr(process))
        ids = RecordingAllocator(sim_node.reservation, process, sim_node.handed_out)
        audit = AuditLog.open(sim_node.audit_log, node_id, ids, now=sim_node.clock.rfc3339)
        try:
            store = Store(MountedDisk(sim_node.media, process, rng, max_latency=spec.disk_latency))
            outbox = PeerOutbox(n for n in spec.node_ids if n != node_id)
            metrics = metrics_for(node_id)
            node = Node(
                node_id=node_id,
                key=node_key(node_id),
                config=self.config,
                round_timeout=spec.round_timeout,
                store=store,
                audit=audit,
                ids=ids,
                metrics=metrics,
                observer=SimObserver(
                    node_id,
                    rng,
                    tis=0.8 + 0.1 * self.rng(f"tis|{node_id}").random(),
                    slow=spec.observer_slow,
                    slow_max=spec.round_timeout,
                    absent=spec.observer_absent,
                ),
                outbox=outbox,
                state_file=None,
                clock=sim_node.clock,
                run_blocking=process.run_blocking,
                retain_rounds=spec.retain_rounds,
            )
            node.restore()
            self.checker.restored(node_id, store.disk.db)
            await process.run_blocking(
                partial(
                    audit.append, "daemon_start", {"version": __version__, "pid": process.number}
                )
            )
            supervisor = PeerSupervisor(
                WatchedInbox(node, process, self.checker),
                self.config,
                outbox,
                metrics,
                self.network.transports(Sender(node_id, sim_node.address, process)),
                rng=rng,
                clock=sim_node.clock,
            )
            rpc = RpcServer(
                node, metrics, reconcile=supervisor.pull_all, peer_states=supervisor.peer_states
            )
            rpc.set_limits(self.config.limits, self._validator_addresses)
            incarnation = Incarnation(process, node, supervisor)
            try:
                with incarnation.scope:
                    await self._serve(incarnation, sim_node, store, rpc, audit, task_status)
            finally:
                incarnation.ended.set()
        finally:
            audit.close()

    async def _serve(
        self,
        incarnation: Incarnation,
        sim_node: SimNode,
        store: Store,
        rpc: RpcServer,
        audit: AuditLog,
        task_status: trio.TaskStatus[Incarnation],
    ) -> None:
        """The daemon's nesting: the store's writer outlives the node, which outlives
        the RPC port and the links."""
        node_id = sim_node.node_id
        async with trio.open_nursery() as writer:
            await writer.start(store.run)
            async with trio.open_nursery() as root:
                await root.start(incarnation.node.run)
                async with trio.open_nursery() as server:
                    self.network.listen(
                        node_id,
                        Endpoint(
                            incarnation.process,
                            rpc.handle,
                            server,
                            lambda: rpc.limits.max_body_bytes,
                        ),
                    )
                    await root.start(incarnation.supervisor.run)
                    if self._rounds_on:
                        root.start_soon(self._interval_rounds, incarnation, sim_node.clock)
                    task_status.started(incarnation)
                    await incarnation.stop_requested.wait()
                    self.network.close(node_id)
                    server.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
                root.cancel_scope.cancel()
            await incarnation.node.persist_state()
            process = incarnation.process
            await process.run_blocking(partial(audit.append, "daemon_stop", {"reason": "signal"}))
            await process.run_blocking(audit.ids.release)
            writer.cancel_scope.cancel()

    async def _interval_rounds(self, incarnation: Incarnation, clock: SimClock) -> None:
        with incarnation.rounds:
            await RoundCoordinator(incarnation.node, self.spec.interval, lambda: None, clock).run()

    # --- an outside client ------------------------------------------------------------

    async def ask(
        self,
        target: str,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
        sender: Sender = OPERATOR,
    ) -> client.Response | None:
        """One request through the network; None when the connection failed (callers
        bound the wait: a lost request or answer never comes)."""
        try:
            return await self.network.exchange(
                sender, target, method, path, body, {**JSON_HEADERS, **(headers or {})}
            )
        except PeerError:
            return None

    async def send_as(
        self, sender: Sender, target: str, method: str, path: str, body: bytes
    ) -> None:
        """A request from `sender`, its answer ignored (Byzantine mischief)."""
        with trio.move_on_after(CLIENT_TIMEOUT):
            await self.ask(target, method, path, body, sender=sender)


def json_body(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()
