"""Peer supervisor and per-peer tasks: batched gossip, backoff, anti-entropy.

One PeerLink per peer, each in its own cancel scope held by the supervisor, so a
reload can cancel, add or restart one link without touching the others. A link drains
its peer's queue in the outbox the daemon gave both it and the node, and talks through
a PeerTransport; a link that cannot reach its peer only ever delays itself: the node
never waits on it.
"""

from __future__ import annotations

import enum
import json
import logging
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs
import trio

from ._exceptions import PeerError
from .metrics import Metrics
from .models import ClusterConfig, PeerConfig
from .outbox import KINDS, Item, PeerOutbox, PeerQueue
from .seams import Clock, PeerTransport, RandomSource
from .transport.client import HttpClient, Response
from .wire import (
    Batch,
    MessageError,
    SyncRequest,
    parse_batch,
    parse_gossip_answer,
    sync_request_json,
)

log = logging.getLogger("anna.peers")

REQUEST_TIMEOUT = 2.0
ANTI_ENTROPY_INTERVAL = 3.0
BACKOFF_BASE = 0.1
BACKOFF_CAP = 10.0
MAX_BATCH_BYTES = 48 * 1024
JSON_HEADERS = {"content-type": "application/json"}


class Unanswered(enum.Enum):
    """Why a peer call got no HTTP answer; the value is its peer_request status label."""

    TIMEOUT = "timeout"
    UNREACHABLE = "error"  # connect, TLS or I/O failed: nobody there to answer


class Ingested(Protocol):
    @property
    def accepted(self) -> int:
        """How many observations were new."""
        ...


class Inbox(Protocol):
    """What a link hands the node: what its peer sent back (the node)."""

    node_id: str

    async def ingest(self, batch: Batch) -> Ingested: ...

    def sync_request(self) -> SyncRequest: ...


class TransportFactory(Protocol):
    """Makes each link's connections to its peer (`HttpTransports`, or fakes)."""

    def configure(self, config: ClusterConfig) -> None:
        """New TLS settings (start-up, a reload): used by transports made from now on."""
        ...

    def __call__(self, peer: PeerConfig) -> PeerTransport: ...


def backoff_delay(attempt: int, rng: RandomSource) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt, 30)))


@attrs.define
class PeerState:
    up: bool = False
    last_seen: str | None = None
    failures: int = 0


class PeerLink:
    """Everything this node says to one peer, and the anti-entropy pulls from it."""

    def __init__(
        self,
        peer: PeerConfig,
        inbox: Inbox,
        queue: PeerQueue,
        connect: Callable[[PeerConfig], PeerTransport],
        metrics: Metrics,
        *,
        rng: RandomSource,
        clock: Clock,
    ) -> None:
        self.peer = peer
        self._inbox = inbox
        self._queue = queue
        self._connect = connect
        self._metrics = metrics
        self._answered = trio.Event()  # set by every exchange the peer answers
        self.state = PeerState()
        self._rng = rng
        self._clock = clock
        self._renew: set[str] = set()
        self._clients: dict[str, PeerTransport] = {}

    def renew_clients(self) -> None:
        """New TLS settings (a reload): each loop's next request opens a new connection
        with them. A kept-alive connection, or a reconnect from a client made earlier,
        would go on presenting the old, possibly revoked, certificate."""
        self._renew = {"push", "pull"}

    async def _swap_if_renewed(self, role: str, client: PeerTransport) -> PeerTransport:
        if role not in self._renew:
            return client
        self._renew.discard(role)
        await client.aclose()
        self._clients[role] = fresh = self._connect(self.peer)
        return fresh

    async def run(self) -> None:
        self._clients = {role: self._connect(self.peer) for role in ("push", "pull")}
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._push_loop, self._clients["push"])
                nursery.start_soon(self._pull_loop, self._clients["pull"])
        finally:
            with trio.CancelScope(shield=True):
                for client in self._clients.values():
                    await client.aclose()

    def _encode_batch(self, batch: list[Item]) -> bytes:
        """The /rpc/gossip body from items encoded once, when they were broadcast."""
        lists: dict[str, list[bytes]] = {kind: [] for kind in KINDS}
        for kind, encoded in batch:
            lists[kind].append(encoded)
        fields = b"".join(
            b',"' + kind.encode() + b'":[' + b",".join(items) + b"]"
            for kind, items in lists.items()
        )
        return b'{"from":' + json.dumps(self._inbox.node_id).encode() + fields + b"}"

    async def _push_loop(self, client: PeerTransport) -> None:
        attempt = 0
        while True:
            await self._queue.wait_queued()
            batch = self._queue.take_batch(MAX_BATCH_BYTES)
            client = await self._swap_if_renewed("push", client)
            response = await self._call(client, "/rpc/gossip", self._encode_batch(batch))
            if (
                not isinstance(response, Response)
                or response.status >= 500
                or response.status == 429
            ):
                self._queue.put_back(batch)
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
            carried = parse_gossip_answer(response.json())
        except (PeerError, MessageError) as exc:
            log.warning(
                "peer %s answered gossip with %s; its observations come by anti-entropy",
                self.peer.node_id,
                exc,
            )
            return
        if carried.observations:
            await self._inbox.ingest(Batch(observations=carried.observations))

    async def _pull_loop(self, client: PeerTransport) -> None:
        attempt = 0
        while True:
            client = await self._swap_if_renewed("pull", client)
            ok = await self.pull(client)
            attempt = 0 if ok else attempt + 1
            delay = ANTI_ENTROPY_INTERVAL if ok else max(backoff_delay(attempt, self._rng), 0.05)
            with trio.move_on_after(delay):
                await self._queue.wait_pull_request()

    async def pull(self, client: PeerTransport) -> bool:
        """One anti-entropy exchange: send our summary, ingest what we lacked."""
        request = sync_request_json(self._inbox.sync_request())
        response = await self._call(
            client, "/rpc/sync", json.dumps(request, separators=(",", ":")).encode()
        )
        if not isinstance(response, Response) or response.status != 200:
            return False
        try:
            answer = parse_batch(response.json())
        except (PeerError, MessageError):
            return False
        taken = await self._inbox.ingest(answer)
        if answer.more and taken.accepted:
            self._queue.request_pull()  # a capped answer that brought news: the rest comes now
        return True

    async def _call(self, client: PeerTransport, path: str, body: bytes) -> Response | Unanswered:
        peer_id = self.peer.node_id
        started = trio.current_time()
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
        elapsed = trio.current_time() - started
        self._metrics.peer_request_duration.labels(peer_id).observe(elapsed)
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
            moment = datetime.fromtimestamp(self._clock.wall(), UTC)
            self.state.last_seen = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        else:
            self.state.up = False
            self.state.failures += 1


@attrs.define
class _RunningLink:
    link: PeerLink
    scope: trio.CancelScope


class PeerSupervisor:
    """Owns one PeerLink per peer of the validator set, each draining its outbox queue."""

    def __init__(
        self,
        inbox: Inbox,
        config: ClusterConfig,
        outbox: PeerOutbox,
        metrics: Metrics,
        connect: TransportFactory,
        *,
        rng: RandomSource,
        clock: Clock,
    ) -> None:
        self._inbox = inbox
        self._config = config
        self._outbox = outbox
        self._metrics = metrics
        self._connect = connect
        self._rng = rng
        self._clock = clock
        self._links: dict[str, _RunningLink] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def links(self) -> dict[str, PeerLink]:
        return {peer_id: running.link for peer_id, running in self._links.items()}

    def peer_states(self) -> list[dict[str, Any]]:
        return [
            {"node_id": peer_id, "up": link.state.up, "last_seen": link.state.last_seen}
            for peer_id, link in sorted(self.links.items())
        ]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.apply(self._config)
            task_status.started()
            await trio.sleep_forever()  # the links' nursery stays open for a reload to fill

    async def apply(self, config: ClusterConfig, changed: set[str] | None = None) -> None:
        """Make the running links match `config`: cancel removed, start added, restart changed."""
        assert self._nursery is not None
        self._connect.configure(config)
        wanted = {p.node_id: p for p in config.peers if p.node_id != self._inbox.node_id}
        self._outbox.set_peers(wanted)
        for peer_id in list(self._links):
            if peer_id not in wanted or peer_id in (changed or set()):
                self._links.pop(peer_id).scope.cancel()
                if peer_id not in wanted:
                    self._metrics.forget_peer(peer_id)
        if config.tls.enabled:
            for running in self._links.values():
                running.link.renew_clients()
        for peer_id, peer in wanted.items():
            if peer_id not in self._links:
                link = PeerLink(
                    peer,
                    self._inbox,
                    self._outbox.queue(peer_id),
                    self._connect,
                    self._metrics,
                    rng=self._rng,
                    clock=self._clock,
                )
                scope = await self._nursery.start(self._run_link, link)
                self._links[peer_id] = _RunningLink(link, scope)
                self._metrics.peer_up.labels(peer_id).set(0)
        self._config = config

    @staticmethod
    async def _run_link(link: PeerLink, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await link.run()

    async def pull_all(self) -> int:
        """Anti-entropy with every peer now (for /rpc/reconcile); returns peers reached."""
        reached = 0

        async def one(link: PeerLink) -> None:
            nonlocal reached
            client = self._connect(link.peer)
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


class HttpTransports:
    """Peer connections over HTTP/1.1, with mTLS when the cluster has TLS on: the
    server must present the peer's node id (and its pinned fingerprint, if any)."""

    def __init__(
        self,
        metrics: Metrics,
        client_tls: Callable[[ClusterConfig], ssl.SSLContext | None],
    ) -> None:
        self._metrics = metrics
        self._client_tls = client_tls
        self._ssl: ssl.SSLContext | None = None

    def configure(self, config: ClusterConfig) -> None:
        self._ssl = self._client_tls(config)

    def __call__(self, peer: PeerConfig) -> HttpClient:
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
