"""A lean HTTP/1.1 server: h11 over trio streams, keep-alive, TLS, graceful drain.

Replaces quart-trio on hypercorn for the RPC and metrics listeners. Measured on the
2-core dev machine: one small request cost the daemon ~1.5 ms of CPU through quart and
hypercorn (over half of a node's CPU in a round) — the client side had the same story
(rpc/client.py). Here a request is parsed by h11 and answered in one write.

Routing and policy (limits, JSON bodies) live in the handler; this module only moves
bytes: it enforces the body-size limit before reading a body, answers malformed HTTP
with 400, closes idle keep-alive connections at shutdown, and lets in-flight requests
finish.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

log = logging.getLogger("anna.http")

MAX_HEADER_BYTES = 16 * 1024
RECEIVE_SIZE = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 75.0


@attrs.frozen
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client: str


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


def json_response(status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, json.dumps(body, separators=(",", ":")).encode(), headers=headers)


def error_response(status: int, code: str, message: str) -> Response:
    return json_response(status, {"success": False, "error": code, "message": message})


class _BodyTooLarge(Exception):
    pass


DRAIN_BYTES = 4 * 1024 * 1024
DRAIN_SECONDS = 2.0


async def _drain(stream: trio.abc.Stream) -> None:
    """Read and drop what the client is still sending, so it reads our 413, not a reset."""
    received = 0
    with trio.move_on_after(DRAIN_SECONDS):
        while received < DRAIN_BYTES:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                return
            received += len(data)


class HttpServer:
    """Serves `handler` on one listener until `shutdown()`; owns its connections."""

    def __init__(
        self,
        handler: Handler,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_body_bytes: Callable[[], int] = lambda: 64 * 1024,
    ) -> None:
        self._handler = handler
        self._ssl = ssl_context
        self._max_body = max_body_bytes
        self._closing = False
        self._idle_scopes: set[trio.CancelScope] = set()
        self._listeners: list[trio.SocketListener] = []

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the bound port, serve until shutdown() and the drain finish."""
        self._listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as connections:
            connections.start_soon(self._accept_loop, connections)
            task_status.started(self._listeners[0].socket.getsockname()[1])

    async def _accept_loop(self, connections: trio.Nursery) -> None:
        try:
            async with trio.open_nursery() as acceptors:
                for listener in self._listeners:
                    acceptors.start_soon(self._accept, listener, connections)
        except trio.ClosedResourceError:
            pass

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while not self._closing:
            try:
                stream = await listener.accept()
            except (trio.ClosedResourceError, OSError) as exc:
                if self._closing:
                    return
                log.warning("accept failed: %s", exc)
                await trio.sleep(0.01)
                continue
            connections.start_soon(self._connection, stream)

    async def shutdown(self) -> None:
        """Stop accepting, close idle connections; requests in flight run to completion."""
        self._closing = True
        for listener in self._listeners:
            await listener.aclose()
        for scope in list(self._idle_scopes):
            scope.cancel()

    async def _connection(self, tcp: trio.SocketStream) -> None:
        try:
            client = str(tcp.socket.getpeername()[0])
        except OSError:
            await tcp.aclose()
            return
        stream: trio.abc.Stream
        if self._ssl is not None:
            tls_stream = trio.SSLStream(tcp, self._ssl, server_side=True, https_compatible=True)
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await tls_stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                # Refused (no/unknown/revoked certificate, plaintext…): the TLS layer counted it.
                await trio.aclose_forcefully(tcp)
                return
            stream = tls_stream
        else:
            stream = tcp
        try:
            await self._serve_requests(stream, client)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_requests(self, stream: trio.abc.Stream, client: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        while True:
            try:
                head = await self._next_request(stream, conn)
                if head is None:
                    return
                request = await self._read_body(stream, conn, head, client)
            except h11.RemoteProtocolError as exc:
                await self._send_error(stream, conn, 400, "bad_request", f"malformed HTTP: {exc}")
                return
            except _BodyTooLarge:
                limit = self._max_body()
                await self._send_error(
                    stream, conn, 413, "payload_too_large", f"body over {limit} bytes"
                )
                await _drain(stream)
                return
            response = await self._answer(request)
            await self._send(stream, conn, response)
            if conn.our_state is h11.MUST_CLOSE or self._closing:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _answer(self, request: Request) -> Response:
        """The listener outlives any handler: an unexpected exception is a logged 500, not
        the end of the daemon; a HEAD answer keeps its headers and drops its body (h11
        refuses to send one)."""
        try:
            response = await self._handler(request)
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            response = error_response(500, "internal_error", "internal server error")
        if request.method == "HEAD":
            response = attrs.evolve(response, body=b"")
        return response

    async def _next_request(
        self, stream: trio.abc.Stream, conn: h11.Connection
    ) -> h11.Request | None:
        """The next request head, or None when the client (or shutdown) ends the connection."""
        waiting_for_first_byte = True
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if self._closing and waiting_for_first_byte:
                    return None
                with trio.CancelScope() as idle:
                    idle.deadline = trio.current_time() + (
                        KEEP_ALIVE_TIMEOUT if waiting_for_first_byte else HEADER_TIMEOUT
                    )
                    if waiting_for_first_byte:
                        self._idle_scopes.add(idle)
                    try:
                        data = await stream.receive_some(RECEIVE_SIZE)
                    finally:
                        self._idle_scopes.discard(idle)
                if idle.cancelled_caught:
                    return None
                waiting_for_first_byte = False
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Request):
                return event
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _read_body(
        self, stream: trio.abc.Stream, conn: h11.Connection, head: h11.Request, client: str
    ) -> Request:
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in head.headers
        }
        limit = self._max_body()
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        # One deadline for the whole body, armed only around reads: most bodies arrive
        # with their head, and a cancel scope per request was ~8 % of a small request.
        deadline = trio.current_time() + BODY_TIMEOUT
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_at(deadline):
                    data = await stream.receive_some(RECEIVE_SIZE)
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise _BodyTooLarge
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise h11.RemoteProtocolError("connection closed inside a request body")
        target = head.target.decode("latin-1")
        parts = urlsplit(target)
        return Request(
            method=head.method.decode("latin-1").upper(),
            path=parts.path,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers=headers,
            body=b"".join(chunks),
            client=client,
        )

    async def _send(
        self, stream: trio.abc.Stream, conn: h11.Connection, response: Response
    ) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if self._closing:
            headers.append(("connection", "close"))
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data or b"")

    async def _send_error(
        self, stream: trio.abc.Stream, conn: h11.Connection, status: int, code: str, message: str
    ) -> None:
        """Best effort: the connection is in trouble and closes after this."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response = error_response(status, code, message)
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("connection", "close"),
        ]
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers))
            data = (data or b"") + (conn.send(h11.Data(data=response.body)) or b"")
            data += conn.send(h11.EndOfMessage()) or b""
            with trio.move_on_after(1):
                await stream.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
