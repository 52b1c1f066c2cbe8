"""A peer link against fake peers: a pull answered with junk costs that pull, never the
daemon; a queued batch goes as soon as the peer answers again."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
import trio
import trio.testing

from anna_trio.metrics import Metrics
from anna_trio.models import PeerConfig
from anna_trio.outbox import PeerQueue
from anna_trio.peers import PeerLink
from anna_trio.seams import PeerTransport, SystemClock
from anna_trio.transport.client import PeerConnectionError, Response
from anna_trio.wire import Batch, IngestCounts, SyncRequest

PEER = PeerConfig("node_002", "127.0.0.1", 8002, "00" * 32)


class _FakeNode:
    """The link's Inbox."""

    node_id = "node_001"

    def __init__(self) -> None:
        self.ingested: list[Batch] = []

    def sync_request(self) -> SyncRequest:
        return SyncRequest(summary={}, known_evidence=frozenset(), sender=self.node_id)

    async def ingest(self, batch: Batch) -> IngestCounts:
        self.ingested.append(batch)
        return IngestCounts(len(batch.observations), 0, 0)


class _CannedClient:
    """A PeerTransport whose peer answers every request with the same body."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        return Response(status=200, headers={}, body=self.body)

    async def aclose(self) -> None:
        pass


def link_to(peer: PeerTransport, node: _FakeNode, rng: random.Random | None = None) -> PeerLink:
    return PeerLink(
        PEER,
        node,
        PeerQueue(),
        lambda _: peer,
        Metrics("node_001"),
        rng=rng or random.Random(0),
        clock=SystemClock(),
    )


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"rounds": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", b"junk"],
    ids=["nested-past-limit", "nested-inside-object", "not-json"],
)
async def test_pull_with_junk_answer_fails_quietly(body: bytes) -> None:
    """An unparseable sync answer (even nested past the JSON parser's limit) is a failed
    pull: pull() returns False and nothing is ingested."""
    node = _FakeNode()
    link = link_to(_CannedClient(body), node)
    assert await link.pull(_CannedClient(body)) is False
    assert node.ingested == []


async def test_pull_with_valid_answer_ingests() -> None:
    """The control case: a well-formed answer is ingested and the pull succeeds."""
    node = _FakeNode()
    client = _CannedClient(b'{"rounds": [], "observations": [], "evidence": []}')
    link = link_to(client, node)
    assert await link.pull(client) is True
    assert node.ingested == [Batch()]


async def test_gossip_answer_with_junk_is_logged_and_ingests_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 200 gossip answer that is not JSON costs the carried observations (anti-entropy
    brings them) and says so in the log; one with observations hands them to the node."""
    node = _FakeNode()
    link = link_to(_CannedClient(b""), node)
    await link._take_answer(Response(status=200, headers={}, body=b"junk"))
    assert node.ingested == []
    assert "node_002 answered gossip with invalid JSON" in caplog.text
    await link._take_answer(Response(status=200, headers={}, body=b'{"observations": [{"x": 1}]}'))
    assert node.ingested == [Batch(observations=({"x": 1},))]


class _Peer:
    """A peer that is unreachable (a partition) or busy (answers pulls, 503s gossip)
    until the test makes it well; counts the gossip that arrives."""

    def __init__(self, trouble: str) -> None:
        self.trouble: str | None = trouble
        self.gossip: list[bytes] = []
        self.gossip_arrived = trio.Event()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        if self.trouble == "unreachable":
            raise PeerConnectionError("unreachable")
        if path != "/rpc/gossip":
            return Response(status=200, headers={}, body=b'{"rounds":[],"observations":[]}')
        if self.trouble == "busy":
            return Response(status=503, headers={}, body=b'{"error":"overloaded"}')
        assert body is not None
        self.gossip.append(body)
        self.gossip_arrived.set()
        return Response(status=200, headers={}, body=b'{"success":true}')

    async def aclose(self) -> None:
        pass


class _LongestJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


async def seconds_until_delivered(trouble: str) -> float:
    """Queue a batch while the peer is in trouble for a minute (the push backoff reaches
    its 10 s cap), make the peer well, have a pull get through: how long until the
    batch arrives."""
    peer = _Peer(trouble)
    queue = PeerQueue()
    link = PeerLink(
        PEER,
        _FakeNode(),
        queue,
        lambda _: peer,
        Metrics("node_001"),
        rng=_LongestJitter(),
        clock=SystemClock(),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run)
        queue.put("rounds", b'{"round_id":"r1","window_hours":24}')
        await trio.sleep(60)
        assert peer.gossip == []
        peer.trouble = None
        well = trio.current_time()
        queue.request_pull()
        with trio.fail_after(20):
            await peer.gossip_arrived.wait()
        nursery.cancel_scope.cancel()
    return trio.current_time() - well


async def test_queued_gossip_goes_as_soon_as_an_unreachable_peer_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After a partition, the first answered pull ends the push loop's backoff."""
    assert await seconds_until_delivered("unreachable") < 0.1


async def test_a_busy_peer_keeps_the_push_backoff(autojump_clock: trio.testing.MockClock) -> None:
    """A peer that answered 503 is there but overloaded: an answered pull does not cut
    the backoff short (that would add load where it hurts); the batch waits it out
    (the 10 s backoff that began at 52.7 s ends at 62.7 s)."""
    assert await seconds_until_delivered("busy") == pytest.approx(2.7, abs=0.2)
