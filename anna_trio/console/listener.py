"""The metrics listener's front door: a capped trio listener that relays to hypercorn.

hypercorn bounds what happens inside a connection (an incomplete head, keep-alive, the
read timeout, the backlog; the app bounds bodies) but not how many connections it holds,
and `hypercorn.trio.serve` builds its listeners from its binds, so nothing can wrap
them. The cap therefore stands in front, like Prometheus' LimitListener in front of its
web server: this listener owns the public port, accepts at most `max_connections` at
once (the rest wait in the kernel's backlog), refuses a client address's connection
over `max_per_client` open ones, and relays each connection's bytes to hypercorn on a
Unix socket inside a directory of mode 0700 (server.py): the directory's permissions
are what keep other users from connecting to hypercorn past the cap. A client that
stops reading its answers is disconnected after `send_timeout`: neither hypercorn (its
sends have no deadline) nor this relay holds more than one read's worth per direction.
A client that closes its side gets what is in flight for `drain_after_close` more, and
then the connection ends (at once if it never sent a byte). hypercorn is not told of
the close: told, it drops an answer still in flight, and an idle connection it holds
until its keep-alive timeout, with the slot.

A request hypercorn's own parser refuses (a header line without a colon, a head over
its limit) never reaches the app, so the app cannot count it: the relay does, from the
refusal passing through (`hypercorn_refusal`), so every listener counts its malformed
input in anna_http_errors_total.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from collections.abc import Callable

import attrs
import trio

from .app import MALFORMED, TOO_LARGE

log = logging.getLogger("anna.console")

RECEIVE_SIZE = 64 * 1024
# As trio.serve_listeners: these accept errors mean "out of resources", so wait and retry.
ACCEPT_RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_DELAY = 0.1

PER_CLIENT_CAP, SEND_TIMEOUT = "per_client_cap", "send_timeout"


def hypercorn_refusal(answer: bytes) -> str | None:
    """The error kind when `answer`, the last bytes hypercorn sent before it closed the
    connection, ends in its own refusal of a request it could not parse: a 4xx with
    `content-length: 0` (the app's refusals all carry a JSON body); None otherwise."""
    tail = answer[answer.rfind(b"HTTP/1.1 4") :] if b"HTTP/1.1 4" in answer else b""
    head, ended, body = tail.partition(b"\r\n\r\n")
    if not ended or body or b"\r\ncontent-length: 0\r\n" not in head.lower() + b"\r\n":
        return None
    return TOO_LARGE if head[9:12] in (b"413", b"431") else MALFORMED


@attrs.frozen
class ConnectionLimits:
    """Bounds of the front door (documented in docs/operations.md)."""

    max_connections: int = 256
    max_per_client: int = 64
    send_timeout: float = 10.0
    drain_after_close: float = 1.0
    backlog: int = 128


class CappedRelay:
    """Accepts on the public address within `limits` and relays each connection to a
    Unix socket. `dropped(reason)` is told of every connection it refuses or ends for a
    limit, `opened(count)` of the number open whenever it changes, `refused(kind)` of
    every request hypercorn's parser refused."""

    def __init__(
        self,
        limits: ConnectionLimits,
        *,
        dropped: Callable[[str], None] = lambda reason: None,
        opened: Callable[[int], None] = lambda count: None,
        refused: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self._backend = ""
        self._refused = refused
        self._limits = limits
        self._dropped = dropped
        self._opened = opened
        self._slots = trio.Semaphore(limits.max_connections)
        self._per_client: Counter[str] = Counter()
        self._listeners: list[trio.SocketListener] = []

    @property
    def open_connections(self) -> int:
        return self._limits.max_connections - self._slots.value

    async def serve(
        self,
        host: str,
        port: int,
        backend: str,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, report the bound (host, port), relay to the Unix socket at the path
        `backend` until `close()` and the last connection end (cancelled, it closes its
        listeners all the same)."""
        self._backend = backend
        self._listeners = await trio.open_tcp_listeners(
            port, host=host, backlog=self._limits.backlog
        )
        try:
            async with trio.open_nursery() as connections:
                for listener in self._listeners:
                    connections.start_soon(self._accept, listener, connections)
                bound = self._listeners[0].socket.getsockname()
                task_status.started((str(bound[0]), int(bound[1])))
        finally:
            self.close()

    def close(self) -> None:
        """Stop accepting; open connections end when hypercorn ends them."""
        for listener in self._listeners:
            listener.socket.close()

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while True:
            await self._slots.acquire()
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                self._slots.release()
                return
            except OSError as exc:
                self._slots.release()
                if exc.errno not in ACCEPT_RETRY_ERRNOS:
                    raise
                log.warning("metrics listener: accept failed (%s); retrying", exc)
                await trio.sleep(ACCEPT_RETRY_DELAY)
                continue
            connections.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        """One client: its slot is freed when the connection ends, its address's share
        as soon as the client closes its side (a client that opens a connection per
        request is not refused for the ones still draining)."""
        try:
            try:
                client = str(stream.socket.getpeername()[0])
            except OSError:
                return  # gone before we looked
            if self._per_client[client] >= self._limits.max_per_client:
                self._dropped(PER_CLIENT_CAP)
                return
            self._per_client[client] += 1
            self._opened(self.open_connections)
            left = False

            def leave() -> None:
                nonlocal left
                if not left:
                    left = True
                    self._per_client[client] -= 1
                    if not self._per_client[client]:
                        del self._per_client[client]

            try:
                await self._relay(stream, leave)
            finally:
                leave()
        finally:
            await trio.aclose_forcefully(stream)
            self._slots.release()
            self._opened(self.open_connections)

    async def _relay(self, client: trio.SocketStream, closed: Callable[[], None]) -> None:
        try:
            backend = await trio.open_unix_socket(self._backend)
        except OSError:
            return  # hypercorn has stopped (shutdown): nothing to relay to
        async with backend, trio.open_nursery() as pumps:
            pumps.start_soon(self._requests, client, backend, pumps.cancel_scope, closed)
            pumps.start_soon(self._answers, backend, client, pumps.cancel_scope)

    async def _requests(
        self,
        client: trio.SocketStream,
        backend: trio.SocketStream,
        both: trio.CancelScope,
        closed: Callable[[], None],
    ) -> None:
        """Client → hypercorn; blocks when hypercorn stops reading (it pauses a pipelined
        request until the one before is answered), so nothing piles up here. The
        client's close (`closed()`) starts the drain."""
        sent = False
        try:
            while data := await client.receive_some(RECEIVE_SIZE):
                await backend.send_all(data)
                sent = True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            both.cancel()
            return
        closed()
        both.deadline = min(
            both.deadline,
            trio.current_time() + (self._limits.drain_after_close if sent else 0.0),
        )

    async def _answers(
        self, backend: trio.SocketStream, client: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        """hypercorn → client, each write within send_timeout; hypercorn closing its end
        ends the connection."""
        last = b""
        try:
            while data := await backend.receive_some(RECEIVE_SIZE):
                last = data
                with trio.move_on_after(self._limits.send_timeout) as sending:
                    await client.send_all(data)
                if sending.cancelled_caught:
                    self._dropped(SEND_TIMEOUT)
                    break
            else:  # hypercorn closed: after its own refusal of a request?
                if kind := hypercorn_refusal(last):
                    log.info("metrics listener: hypercorn refused a request (%s)", kind)
                    self._refused(kind)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        both.cancel()
