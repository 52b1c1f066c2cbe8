"""A peer link against fake peers: a pull answered with junk costs that pull, never the
daemon; a queued batch goes as soon as the peer answers again."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from anna_trio.metrics import Metrics
from anna_trio.models import PeerConfig
from anna_trio.peers import PeerLink
from anna_trio.transport.client import PeerConnectionError, Response

PEER = PeerConfig("node_002", "127.0.0.1", 8002, "00" * 32)


class _FakeNode:
    node_id = "node_001"

    def __init__(self) -> None:
        self.ingested: list[Any] = []

    def sync_request(self) -> dict[str, Any]:
        return {"from": self.node_id, "summary": {}, "evidence": []}

    async def ingest(self, payload: Any) -> None:
        self.ingested.append(payload)


class _CannedClient:
    def __init__(self, body: bytes) -> None:
        self.body = body

    async def request(self, method: str, path: str, **_: Any) -> Response:
        return Response(status=200, headers={}, body=self.body)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"rounds": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", b"junk"],
    ids=["nested-past-limit", "nested-inside-object", "not-json"],
)
async def test_pull_with_junk_answer_fails_quietly(body: bytes) -> None:
    """An unparseable sync answer (even nested past the JSON parser's limit) is a failed
    pull: pull() returns False and nothing is ingested."""
    node = _FakeNode()
    link = PeerLink(PEER, node, lambda peer: _CannedClient(body), Metrics("node_001"))  # type: ignore[arg-type, return-value]
    assert await link.pull(_CannedClient(body)) is False  # type: ignore[arg-type]
    assert node.ingested == []


async def test_pull_with_valid_answer_ingests() -> None:
    """The control case: a well-formed answer is ingested and the pull succeeds."""
    node = _FakeNode()
    client = _CannedClient(b'{"rounds": [], "observations": [], "evidence": []}')
    link = PeerLink(PEER, node, lambda peer: client, Metrics("node_001"))  # type: ignore[arg-type, return-value]
    assert await link.pull(client) is True  # type: ignore[arg-type]
    assert node.ingested == [{"rounds": [], "observations": [], "evidence": []}]


async def test_gossip_answer_with_junk_is_logged_and_ingests_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 200 gossip answer that is not JSON costs the carried observations (anti-entropy
    brings them) and says so in the log; one with observations hands them to the node."""
    node = _FakeNode()
    link = PeerLink(PEER, node, lambda peer: _CannedClient(b""), Metrics("node_001"))  # type: ignore[arg-type, return-value]
    await link._take_answer(Response(status=200, headers={}, body=b"junk"))
    assert node.ingested == []
    assert "node_002 answered gossip with invalid JSON" in caplog.text
    await link._take_answer(Response(status=200, headers={}, body=b'{"observations": [{"x": 1}]}'))
    assert node.ingested == [{"observations": [{"x": 1}]}]


class _Peer:
    """A peer that is unreachable (a partition) or busy (answers pulls, 503s gossip)
    until the test makes it well; counts the gossip that arrives."""

    def __init__(self, trouble: str) -> None:
        self.trouble: str | None = trouble
        self.gossip: list[bytes] = []
        self.gossip_arrived = trio.Event()

    async def request(self, method: str, path: str, **options: Any) -> Response:
        if self.trouble == "unreachable":
            raise PeerConnectionError("unreachable")
        if path != "/rpc/gossip":
            return Response(status=200, headers={}, body=b'{"rounds":[],"observations":[]}')
        if self.trouble == "busy":
            return Response(status=503, headers={}, body=b'{"error":"overloaded"}')
        self.gossip.append(options["body"])
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
    link = PeerLink(PEER, _FakeNode(), lambda _: peer, Metrics("node_001"))  # type: ignore[arg-type, return-value]
    link._rng = _LongestJitter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run)
        link.enqueue("rounds", b'{"round_id":"r1","window_hours":24}')
        await trio.sleep(60)
        assert peer.gossip == []
        peer.trouble = None
        well = trio.current_time()
        link.request_pull()
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
