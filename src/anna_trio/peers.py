"""Peer supervisor and per-peer tasks: bounded queues, batched gossip, backoff, anti-entropy.

One PeerLink per peer, each in its own cancel scope held by the supervisor, so a
reload can cancel, add or restart one link without touching the others. A link
that cannot reach its peer only ever delays itself: the node never waits on it.
"""

from __future__ import annotations

import enum
import json
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

import attrs
import trio

from ._exceptions import PeerError
from .metrics import Metrics
from .models import ClusterConfig, PeerConfig
from .node import Node
from .transport.client import HttpClient, Response

log = logging.getLogger("anna.peers")

REQUEST_TIMEOUT = 2.0
ANTI_ENTROPY_INTERVAL = 3.0
BACKOFF_BASE = 0.1
BACKOFF_CAP = 10.0
MAX_QUEUE = 10_000
MAX_BATCH_BYTES = 48 * 1024
KINDS = ("rounds", "evidence", "observations")
JSON_HEADERS = {"content-type": "application/json"}


class Unanswered(enum.Enum):
    """Why a peer call got no HTTP answer; the value is its peer_request status label."""

    TIMEOUT = "timeout"
    UNREACHABLE = "error"  # connect, TLS or I/O failed: nobody there to answer


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt, 30)))


@attrs.define
class PeerState:
    up: bool = False
    last_seen: str | None = None
    failures: int = 0


ClientFactory = Callable[[PeerConfig], HttpClient]


class PeerLink:
    """Everything this node says to one peer, and the anti-entropy pulls from it."""

    def __init__(
        self, peer: PeerConfig, node: Node, make_client: ClientFactory, metrics: Metrics
    ) -> None:
        self.peer = peer
        self._node = node
        self._make_client = make_client
        self._metrics = metrics
        self._queue: deque[tuple[str, bytes]] = deque(maxlen=MAX_QUEUE)
        self._wakeup = trio.Event()
        self._pull_now = trio.Event()
        self._answered = trio.Event()  # set by every exchange the peer answers
        self.state = PeerState()
        self._rng = random.Random()
        self._renew: set[str] = set()
        self._clients: dict[str, HttpClient] = {}

    def enqueue(self, kind: str, encoded: bytes) -> None:
        """Never blocks: a full queue drops its oldest item (anti-entropy repairs it)."""
        self._queue.append((kind, encoded))
        self._wakeup.set()

    def request_pull(self) -> None:
        self._pull_now.set()

    def renew_clients(self) -> None:
        """New TLS settings (a reload): each loop's next request opens a new connection
        with them. A kept-alive connection, or a reconnect from a client made earlier,
        would go on presenting the old, possibly revoked, certificate."""
        self._renew = {"push", "pull"}

    async def _swap_if_renewed(self, role: str, client: HttpClient) -> HttpClient:
        if role not in self._renew:
            return client
        self._renew.discard(role)
        await client.aclose()
        self._clients[role] = fresh = self._make_client(self.peer)
        return fresh

    async def run(self) -> None:
        self._clients = {role: self._make_client(self.peer) for role in ("push", "pull")}
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._push_loop, self._clients["push"])
                nursery.start_soon(self._pull_loop, self._clients["pull"])
        finally:
            with trio.CancelScope(shield=True):
                for client in self._clients.values():
                    await client.aclose()

    def _take_batch(self) -> list[tuple[str, bytes]]:
        batch: list[tuple[str, bytes]] = []
        size = 0
        while self._queue:
            kind, encoded = self._queue[0]
            if size and size + len(encoded) + 1 > MAX_BATCH_BYTES:
                break
            self._queue.popleft()
            batch.append((kind, encoded))
            size += len(encoded) + 1
        return batch

    def _encode_batch(self, batch: list[tuple[str, bytes]]) -> bytes:
        """The /rpc/gossip body from items encoded once, when they were broadcast."""
        lists: dict[str, list[bytes]] = {kind: [] for kind in KINDS}
        for kind, encoded in batch:
            lists[kind].append(encoded)
        fields = b"".join(
            b',"' + kind.encode() + b'":[' + b",".join(items) + b"]"
            for kind, items in lists.items()
        )
        return b'{"from":' + json.dumps(self._node.node_id).encode() + fields + b"}"

    def _requeue(self, batch: list[tuple[str, bytes]]) -> None:
        for item in reversed(batch):
            if len(self._queue) < MAX_QUEUE:
                self._queue.appendleft(item)

    async def _push_loop(self, client: HttpClient) -> None:
        attempt = 0
        while True:
            if not self._queue:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            batch = self._take_batch()
            client = await self._swap_if_renewed("push", client)
            response = await self._call(client, "/rpc/gossip", self._encode_batch(batch))
            if (
                not isinstance(response, Response)
                or response.status >= 500
                or response.status == 429
            ):
                self._requeue(batch)
                await self._back_off(attempt, until_answered=response is Unanswered.UNREACHABLE)
                attempt += 1
            else:
                attempt = 0
                if response.status == 200:
                    await self._take_answer(response)

    async def _back_off(self, attempt: int, *, until_answered: bool) -> None:
        """Wait out the backoff. When the push found no peer at all (not a timeout, not
        an overloaded 5xx or 429), an answered pull ends the wait: the peer is back, and
        what is queued goes now. After a partition the backoff has grown to seconds
        (10 s cap), and a round started meanwhile waited it out in the queue (a chaos
        run: rounds Complete without the healed node for lack of its start)."""
        delay = backoff_delay(attempt, self._rng)
        if not until_answered:
            await trio.sleep(delay)
            return
        self._answered = trio.Event()
        with trio.move_on_after(delay):
            await self._answered.wait()

    async def _take_answer(self, response: Response) -> None:
        """The peer's own observations for the rounds we sent it (the node relays them)."""
        try:
            answer = response.json()
        except PeerError as exc:
            log.warning(
                "peer %s answered gossip with %s; its observations come by anti-entropy",
                self.peer.node_id,
                exc,
            )
            return
        if isinstance(answer, dict) and answer.get("observations"):
            await self._node.ingest({"observations": answer["observations"]})

    async def _pull_loop(self, client: HttpClient) -> None:
        attempt = 0
        while True:
            client = await self._swap_if_renewed("pull", client)
            ok = await self.pull(client)
            attempt = 0 if ok else attempt + 1
            delay = ANTI_ENTROPY_INTERVAL if ok else max(backoff_delay(attempt, self._rng), 0.05)
            with trio.move_on_after(delay):
                await self._pull_now.wait()
            self._pull_now = trio.Event()

    async def pull(self, client: HttpClient) -> bool:
        """One anti-entropy exchange: send our summary, ingest what we lacked."""
        response = await self._call(
            client,
            "/rpc/sync",
            json.dumps(self._node.sync_request(), separators=(",", ":")).encode(),
        )
        if not isinstance(response, Response) or response.status != 200:
            return False
        try:
            payload = response.json()
        except PeerError:
            return False
        taken = await self._node.ingest(payload)
        if isinstance(payload, dict) and payload.get("more") is True and taken.body.get("accepted"):
            self.request_pull()  # a capped answer that brought news: the rest comes now
        return True

    async def _call(self, client: HttpClient, path: str, body: bytes) -> Response | Unanswered:
        peer_id = self.peer.node_id
        started = time.perf_counter()
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                response = await client.request("POST", path, body=body, headers=JSON_HEADERS)
        except trio.TooSlowError:
            self._mark(False, Unanswered.TIMEOUT.value)
            await client.aclose()
            return Unanswered.TIMEOUT
        except PeerError as exc:
            self._mark(False, Unanswered.UNREACHABLE.value)
            if self.state.failures in (1, 10) or self.state.failures % 100 == 0:
                log.warning("peer %s unreachable (%s); retrying with backoff", peer_id, exc)
            return Unanswered.UNREACHABLE
        self._metrics.peer_request_duration.labels(peer_id).observe(time.perf_counter() - started)
        if response.status >= 500:
            self._mark(False, "error")
        elif response.status >= 400:
            self._mark(True, "rejected")
        else:
            self._mark(True, "success")
        return response

    def _mark(self, up: bool, status: str) -> None:
        peer_id = self.peer.node_id
        self._metrics.peer_requests.labels(peer_id, status).inc()
        self._metrics.peer_up.labels(peer_id).set(1 if up else 0)
        if up:
            self._answered.set()
            if not self.state.up and self.state.failures:
                log.info("peer %s is back after %d failures", peer_id, self.state.failures)
            self.state.up, self.state.failures = True, 0
            self.state.last_seen = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        else:
            self.state.up = False
            self.state.failures += 1


@attrs.define
class _RunningLink:
    link: PeerLink
    scope: trio.CancelScope


class PeerSupervisor:
    """Owns one PeerLink per peer; implements the node's Outbox."""

    def __init__(
        self,
        node: Node,
        metrics: Metrics,
        client_tls: Callable[[ClusterConfig], ssl.SSLContext | None],
    ) -> None:
        self._node = node
        self._metrics = metrics
        self._client_tls = client_tls
        self._links: dict[str, _RunningLink] = {}
        self._nursery: trio.Nursery | None = None
        self._ssl: ssl.SSLContext | None = None

    @property
    def links(self) -> dict[str, PeerLink]:
        return {peer_id: running.link for peer_id, running in self._links.items()}

    def peer_states(self) -> list[dict[str, Any]]:
        return [
            {"node_id": peer_id, "up": link.state.up, "last_seen": link.state.last_seen}
            for peer_id, link in sorted(self.links.items())
        ]

    def broadcast(self, kind: str, item: dict[str, Any], exclude: Collection[str] = ()) -> None:
        encoded = json.dumps(item, separators=(",", ":")).encode()
        for peer_id, running in self._links.items():
            if peer_id not in exclude:
                running.link.enqueue(kind, encoded)

    def pull_soon(self) -> None:
        for running in self._links.values():
            running.link.request_pull()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.apply(self._node.config)
            self._node.outbox = self
            self._node.peer_states = self.peer_states
            task_status.started()

    async def apply(self, config: ClusterConfig, changed: set[str] | None = None) -> None:
        """Make the running links match `config`: cancel removed, start added, restart changed."""
        assert self._nursery is not None
        self._ssl = self._client_tls(config)
        wanted = {p.node_id: p for p in config.peers if p.node_id != self._node.node_id}
        for peer_id in list(self._links):
            if peer_id not in wanted or peer_id in (changed or set()):
                self._links.pop(peer_id).scope.cancel()
                if peer_id not in wanted:
                    self._metrics.forget_peer(peer_id)
        if self._ssl is not None:
            for running in self._links.values():
                running.link.renew_clients()
        for peer_id, peer in wanted.items():
            if peer_id not in self._links:
                link = PeerLink(peer, self._node, self._make_client, self._metrics)
                scope = await self._nursery.start(self._run_link, link)
                self._links[peer_id] = _RunningLink(link, scope)
                self._metrics.peer_up.labels(peer_id).set(0)

    @staticmethod
    async def _run_link(link: PeerLink, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await link.run()

    def _make_client(self, peer: PeerConfig) -> HttpClient:
        from . import tls

        context = self._ssl

        def verify(ssl_object: ssl.SSLObject) -> str | None:
            return tls.check_peer_identity(
                ssl_object, expected_node_id=peer.node_id, pinned_fingerprint=peer.fingerprint
            )

        def count_failure(reason: str) -> None:
            self._metrics.tls_handshake_failures.labels("client", reason).inc()

        return HttpClient(
            peer.address,
            peer.port,
            ssl_context=context,
            server_hostname=peer.address if context else None,
            verify_peer=verify if context else None,
            on_tls_failure=count_failure,
        )

    async def pull_all(self) -> int:
        """Anti-entropy with every peer now (for /rpc/reconcile); returns peers reached."""
        reached = 0

        async def one(link: PeerLink) -> None:
            nonlocal reached
            client = self._make_client(link.peer)
            try:
                if await link.pull(client):
                    reached += 1
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()

        async with trio.open_nursery() as nursery:
            for running in list(self._links.values()):
                nursery.start_soon(one, running.link)
        return reached
