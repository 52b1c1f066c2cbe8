"""Push-pull gossip between real Node objects over an in-memory network, on the autojump
clock (each test takes it directly: pytest-trio only uses a clock passed to the test):
who sends what to whom in a round, and how a round recovers when a relay or an answer
goes missing.

`_Network` stands in for the peer supervisor: one sequential link per ordered pair of
nodes (as PeerLink), batches posted to `Node.gossip`, observations in the answer handed
to the sender's `Node.ingest` (as `PeerLink._take_answer`), `pull_soon` answered with
one anti-entropy exchange per peer (as `PeerLink.pull`).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from anna_trio import crypto
from anna_trio.audit import AuditIdAllocator, AuditLog
from anna_trio.metrics import Metrics
from anna_trio.models import ClusterConfig, Limits, PeerConfig, SyntheticObserver
from anna_trio.node import OWN_ANSWER_WAIT, Node
from anna_trio.observer import ConfiguredObserver, Measurement
from anna_trio.policy import RELAY_LINGER, STUCK_ROUND_FRACTION
from anna_trio.wire import Batch, parse_batch, sync_answer_json
from inline_store import InlineStore

ROUND_TIMEOUT = 2.0
ROUND = "round_20261127T000000Z"


class _SlowObserver(ConfiguredObserver):
    """An observer that takes `delay` seconds to measure (a slow node)."""

    def __init__(self, node_id: str, delay: float) -> None:
        super().__init__(SyntheticObserver(), node_id)
        self.delay = delay

    async def measure(self, round_id: str, window_hours: int) -> Measurement | None:
        await trio.sleep(self.delay)
        return await super().measure(round_id, window_hours)


class _Network:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.queues: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
        self.wakeups: dict[tuple[str, str], trio.Event] = {}
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.answered_in: collections.defaultdict[tuple[str, str], list[float]] = (
            collections.defaultdict(list)
        )
        self.pulls: collections.Counter[str] = collections.Counter()
        # Batches each gossip link still delivers (absent: all); the rest are lost.
        self.allowed: dict[tuple[str, str], int] = {}
        self.nursery: trio.Nursery | None = None

    def outbox(self, node_id: str) -> _Links:
        return _Links(self, node_id)

    def enqueue(self, source: str, target: str, kind: str, item: dict[str, Any]) -> None:
        self.queues.setdefault((source, target), []).append((kind, item))
        self.wakeups.setdefault((source, target), trio.Event()).set()

    async def link(self, source: str, target: str) -> None:
        key = (source, target)
        while True:
            if not self.queues.get(key):
                self.wakeups[key] = trio.Event()
                await self.wakeups[key].wait()
                continue
            batch, self.queues[key] = self.queues[key], []
            allowed = self.allowed.get(key)
            if allowed == 0:
                continue
            if allowed is not None:
                self.allowed[key] = allowed - 1
            payload: dict[str, Any] = {"from": source}
            for kind, item in batch:
                payload.setdefault(kind, []).append(item)
            self.requests[key] += 1
            sent = trio.current_time()
            _, own = await self.nodes[target].gossip(parse_batch(payload))
            self.answered_in[key].append(trio.current_time() - sent)
            if own:
                carried = tuple(obs.to_dict() for obs in own)
                await self.nodes[source].ingest(Batch(observations=carried))

    def pull_soon(self, node_id: str) -> None:
        self.pulls[node_id] += 1
        assert self.nursery is not None
        self.nursery.start_soon(self._pull_all, node_id)

    async def _pull_all(self, node_id: str) -> None:
        node = self.nodes[node_id]
        for peer_id, peer in self.nodes.items():
            if peer_id != node_id:
                answer = sync_answer_json(peer.sync_answer(node.sync_request()))
                await node.ingest(parse_batch(answer))


class _Links:
    def __init__(self, network: _Network, node_id: str) -> None:
        self.network, self.node_id = network, node_id

    def broadcast(self, kind: str, item: dict[str, Any], exclude: Collection[str] = ()) -> None:
        for peer_id in self.network.nodes:
            if peer_id != self.node_id and peer_id not in exclude:
                self.network.enqueue(self.node_id, peer_id, kind, item)

    def pull_soon(self) -> None:
        self.network.pull_soon(self.node_id)


def _node(
    directory: Path,
    node_id: str,
    config: ClusterConfig,
    observer: ConfiguredObserver,
    outbox: _Links,
) -> Node:
    ids = AuditIdAllocator()
    return Node(
        node_id=node_id,
        key=crypto.load_or_create_key(directory / node_id / "keys"),
        config=config,
        round_timeout=ROUND_TIMEOUT,
        store=InlineStore(directory / node_id / "node.db"),
        audit=AuditLog.open(directory / node_id / "audit.jsonl", node_id, ids),
        ids=ids,
        metrics=Metrics(node_id),
        observer=observer,
        outbox=outbox,
        state_file=None,
    )


@pytest.fixture
def cluster_of(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> Any:
    """cluster_of(n, slow={node_id: seconds}, limits=Limits(...)) -> an async context
    manager of a _Network."""

    @contextlib.asynccontextmanager
    async def start(
        count: int, slow: dict[str, float] | None = None, limits: Limits | None = None
    ) -> AsyncIterator[_Network]:
        node_ids = [f"node_{i:03d}" for i in range(1, count + 1)]
        keys = {n: crypto.load_or_create_key(tmp_path / n / "keys") for n in node_ids}
        config = ClusterConfig(
            peers=tuple(
                PeerConfig(n, "127.0.0.1", 8000 + i, crypto.public_key_hex(keys[n]))
                for i, n in enumerate(node_ids, 1)
            ),
            allow_insecure_peers=True,
            limits=limits or Limits(),
        )
        network = _Network()
        for n in node_ids:
            observer = (
                _SlowObserver(n, slow[n])
                if slow and n in slow
                else ConfiguredObserver(SyntheticObserver(), n)
            )
            node = network.nodes[n] = _node(tmp_path, n, config, observer, network.outbox(n))
            node.restore()
        async with trio.open_nursery() as nursery:
            network.nursery = nursery
            for node in network.nodes.values():
                await nursery.start(node.store.run)
                await nursery.start(node.run)
            for source in node_ids:
                for target in node_ids:
                    if source != target:
                        nursery.start_soon(network.link, source, target)
            yield network
            nursery.cancel_scope.cancel()
        for node in network.nodes.values():
            node.store.close()

    return start


async def _until(predicate: Any, within: float) -> None:
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - engine state has no event to wait on
            await trio.sleep(0.001)


def _complete_everywhere(network: _Network, count: int) -> bool:
    views = [node.engine.round(ROUND) for node in network.nodes.values()]
    return all(
        v is not None and v.status == "Complete" and len(v.observations) == count for v in views
    )


def _identical(network: _Network) -> None:
    digests = {node.engine.round(ROUND).result.digest for node in network.nodes.values()}  # type: ignore[union-attr]
    assert len(digests) == 1


async def test_three_validators_send_directly_in_four_requests(
    cluster_of: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """N = 3: the start carries the starter's observation, each peer answers with its own
    and sends it to the third node: 4 requests, nothing twice, and everyone Complete."""
    async with cluster_of(3) as network:
        await network.nodes["node_001"].start_round(ROUND, 24)
        await _until(lambda: _complete_everywhere(network, 3), ROUND_TIMEOUT / 2)
        await trio.sleep(1.0)  # let anything else that would be sent go out
        _identical(network)
        assert network.requests == {
            ("node_001", "node_002"): 1,
            ("node_001", "node_003"): 1,
            ("node_002", "node_003"): 1,
            ("node_003", "node_002"): 1,
        }
        assert not network.pulls
        for node in network.nodes.values():
            assert node.metrics.observations_received.labels("duplicate")._value.get() == 0


@pytest.mark.parametrize("count", [5, 9])
async def test_larger_clusters_relay_through_the_starter(
    cluster_of: Any, autojump_clock: trio.testing.MockClock, count: int
) -> None:
    """N > 3: peers answer the start with their observation and send nothing to each other;
    the starter relays them in one batch per peer: 2(N-1) requests in all."""
    async with cluster_of(count) as network:
        await network.nodes["node_001"].start_round(ROUND, 24)
        await _until(lambda: _complete_everywhere(network, count), ROUND_TIMEOUT / 2)
        await trio.sleep(1.0)
        _identical(network)
        assert all(source == "node_001" for source, _ in network.requests), network.requests
        assert sum(network.requests.values()) == 2 * (count - 1), network.requests
        assert not network.pulls


async def test_slow_observation_is_not_waited_for_but_broadcast_later(
    cluster_of: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that cannot sign within OWN_ANSWER_WAIT answers without its observation; the
    others complete at the round timeout without it, and it reaches all of them once
    signed (sent by the slow node itself, not carried)."""
    delay = ROUND_TIMEOUT + 0.5
    async with cluster_of(5, slow={"node_003": delay}) as network:
        started = trio.current_time()
        await network.nodes["node_001"].start_round(ROUND, 24)
        fast = [n for n in network.nodes if n != "node_003"]

        def fast_complete_without_slow() -> bool:
            views = [network.nodes[n].engine.round(ROUND) for n in fast]
            return all(v is not None and v.status == "Complete" for v in views)

        await _until(fast_complete_without_slow, ROUND_TIMEOUT + 0.2)
        assert trio.current_time() - started >= ROUND_TIMEOUT - 0.01
        for n in fast:
            view = network.nodes[n].engine.round(ROUND)
            assert view is not None
            assert "node_003" not in view.result.participating_nodes
        await _until(lambda: _complete_everywhere(network, 5), delay)
        _identical(network)
        assert network.requests[("node_003", "node_002")] >= 1  # it sent its own


async def test_relays_linger_only_briefly_for_a_missing_answer(
    cluster_of: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """One peer never answers (its link from the starter is cut): the starter relays what
    it has after RELAY_LINGER, not at the round timeout."""
    async with cluster_of(5) as network:
        network.allowed[("node_001", "node_005")] = 0
        started = trio.current_time()
        await network.nodes["node_001"].start_round(ROUND, 24)

        def others_hold_each_other() -> bool:
            views = [network.nodes[f"node_00{i}"].engine.round(ROUND) for i in (2, 3, 4)]
            return all(v is not None and len(v.observations) >= 4 for v in views)

        await _until(others_hold_each_other, ROUND_TIMEOUT)
        assert trio.current_time() - started < RELAY_LINGER + OWN_ANSWER_WAIT


async def test_lost_relay_makes_pending_rounds_pull_early(
    cluster_of: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """The starter's relays never arrive (as if it died after collecting the answers):
    the peers, still Pending a quarter of the round timeout later, pull from everyone
    and complete before the round timeout instead of failing."""
    async with cluster_of(5) as network:
        for i in range(2, 6):
            network.allowed[("node_001", f"node_00{i}")] = 1  # the start, not the relay
        started = trio.current_time()
        await network.nodes["node_001"].start_round(ROUND, 24)
        await _until(lambda: _complete_everywhere(network, 5), ROUND_TIMEOUT)
        assert trio.current_time() - started < ROUND_TIMEOUT
        assert set(network.pulls) >= {f"node_00{i}" for i in range(2, 6)}
        assert trio.current_time() - started >= STUCK_ROUND_FRACTION * ROUND_TIMEOUT - 0.05
        _identical(network)


async def test_early_pulls_are_rate_limited_when_every_round_is_slow(
    cluster_of: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """Eight rounds in a row that all stay Pending (node 5 never hears of them): the
    starter pulls early once per half round timeout, not once per stuck round."""
    async with cluster_of(5) as network:
        network.allowed[("node_001", "node_005")] = 0
        started = trio.current_time()
        for i in range(8):
            await network.nodes["node_001"].start_round(f"{ROUND}.{i}", 24)
            await trio.sleep(0.1)
        await trio.sleep(ROUND_TIMEOUT * 0.9 - (trio.current_time() - started))
        assert 1 <= network.pulls["node_001"] <= 2, network.pulls


async def test_waiting_for_a_slow_observation_stays_within_the_request_timeout(
    cluster_of: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """With a short server request timeout, a gossip answer waits for the node's own
    observation at most half of it, so the wait itself never turns the answer into 503."""
    limits = Limits(request_timeout=0.1)
    async with cluster_of(5, slow={"node_003": 1.0}, limits=limits) as network:
        await network.nodes["node_001"].start_round(ROUND, 24)
        await _until(lambda: network.answered_in[("node_001", "node_003")], 1.0)
        assert network.answered_in[("node_001", "node_003")][0] <= 0.05
        assert network.answered_in[("node_001", "node_002")][0] < 0.05
