"""A lean HTTP/1.1 server: httptools (llhttp, Node's C parser) over trio streams,
keep-alive, pipelining, TLS, graceful drain.

Replaces quart-trio on hypercorn for the RPC and metrics listeners. Measured on the
2-core dev machine: one small request cost the daemon ~1.5 ms of CPU through quart and
hypercorn (over half of a node's CPU in a round); through h11 ~0.26 ms, of which h11's
pure-Python parsing and framing were ~40 µs — llhttp does the same in ~2 µs. A
request is parsed in C and answered in one write.

Routing and policy (limits, JSON bodies) live in the handler; this module only moves
bytes: it enforces the head and body size limits while parsing (a body over the limit
is refused from its Content-Length, before it is read), answers malformed HTTP with
400, closes idle keep-alive connections at shutdown, and lets in-flight requests
finish.
"""

from __future__ import annotations

import collections
import http
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import httptools
import trio

from anna_trio.transport.tlsstream import TlsStream

log = logging.getLogger("anna.http")

MAX_HEADER_BYTES = 16 * 1024
RECEIVE_SIZE = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
KEEP_ALIVE_TIMEOUT = 75.0

# What `count_error` is told: a request refused as malformed HTTP (400) or for its body
# size (413), and a failure of ours (a 500, or a connection closed by an error).
MALFORMED, TOO_LARGE, INTERNAL = "malformed", "too_large", "internal"


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


class _Malformed(Exception):
    pass


class _RequestParser:
    """Feeds one connection's bytes to llhttp; completed requests queue up (pipelining).

    Limits are enforced by raising from a callback, which stops llhttp at once: a body
    over the limit is refused from its Content-Length and never buffered, and a head
    never grows past MAX_HEADER_BYTES (plus one read, for a head that never ends)."""

    def __init__(self, client: str, max_body: Callable[[], int]) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._client = client
        self._max_body = max_body
        self.ready: collections.deque[tuple[Request, bool]] = collections.deque()  # keep-alive?
        self.failure: Exception | None = None  # raised once the ready requests are answered
        self.ends_after_ready = False  # an upgrade or CONNECT: answer what came, then close
        self.in_message = False
        self.head_done = False
        self._fed_in_head = 0
        self._head_size = 0
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0

    def feed(self, data: bytes) -> None:
        if self.in_message and not self.head_done:
            self._fed_in_head += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # Whatever a callback raised is about this request's bytes: a 400, or 413.
            cause = exc.__context__
            if isinstance(cause, _BodyTooLarge | _Malformed):
                self.failure = cause
            else:
                self.failure = _Malformed(f"cannot parse the request: {cause or exc}")
        except httptools.HttpParserUpgrade:
            self.ends_after_ready = True
        except httptools.HttpParserError as exc:
            self.failure = _Malformed(str(exc))
        else:
            if self.in_message and not self.head_done and self._fed_in_head > MAX_HEADER_BYTES:
                self.failure = _Malformed(f"request head over {MAX_HEADER_BYTES} bytes")

    # llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message, self.head_done = True, False
        self._fed_in_head = self._head_size = self._body_size = 0
        self._url, self._headers, self._body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()
        self._count_head(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        self.head_done = True
        if self._parser.get_http_version() == "1.1" and "host" not in self._headers:
            raise _Malformed("an HTTP/1.1 request needs a Host header")
        length = self._headers.get("content-length")
        if length is not None and int(length) > self._max_body():  # llhttp checked the digits
            raise _BodyTooLarge

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body():
            raise _BodyTooLarge
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        try:
            target = urlsplit(self._url.decode("latin-1"))
        except ValueError as exc:  # "//[" or "http://[::1": an unclosed IPv6 bracket
            raise _Malformed(f"request target: {exc}") from exc
        request = Request(
            method=self._parser.get_method().decode("latin-1").upper(),
            path=target.path,
            query=parse_qs(target.query, keep_blank_values=True),
            headers=self._headers,
            body=b"".join(self._body),
            client=self._client,
        )
        self.ready.append((request, self._parser.should_keep_alive()))

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEADER_BYTES:
            raise _Malformed(f"request head over {MAX_HEADER_BYTES} bytes")


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
        count_error: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self._handler = handler
        self._ssl = ssl_context
        self._max_body = max_body_bytes
        self._count_error = count_error
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
        """One connection, whatever happens on it: an error of ours here (the parser,
        the TLS layer, an answer that cannot be encoded) is logged with its traceback,
        counted, and closes this connection only; the listener and the others go on."""
        try:
            await self._serve_connection(tcp)
        except Exception:
            log.exception("internal error on a connection; closing it")
            self._count_error(INTERNAL)
            await trio.aclose_forcefully(tcp)

    async def _serve_connection(self, tcp: trio.SocketStream) -> None:
        try:
            client = str(tcp.socket.getpeername()[0])
        except OSError:
            await tcp.aclose()
            return
        stream: trio.abc.Stream
        if self._ssl is not None:
            tls_stream = TlsStream(tcp, self._ssl, server_side=True)
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
        parser = _RequestParser(client, self._max_body)
        while True:
            try:
                ready = await self._next_request(stream, parser)
            except _Malformed as exc:
                self._count_error(MALFORMED)
                await self._send_error(stream, 400, "bad_request", f"malformed HTTP: {exc}")
                return
            except _BodyTooLarge:
                self._count_error(TOO_LARGE)
                limit = self._max_body()
                await self._send_error(stream, 413, "payload_too_large", f"body over {limit} bytes")
                await _drain(stream)
                return
            if ready is None:
                return
            request, keep_alive = ready
            response = await self._answer(request)
            keep_alive = keep_alive and not self._closing
            await stream.send_all(_encode(response, keep_alive))
            if not keep_alive:
                return

    async def _answer(self, request: Request) -> Response:
        """The listener outlives any handler: an unexpected exception is a logged 500, not
        the end of the daemon; a HEAD answer keeps its status and drops its body."""
        try:
            response = await self._handler(request)
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            self._count_error(INTERNAL)
            response = error_response(500, "internal_error", "internal server error")
        if request.method == "HEAD":
            response = attrs.evolve(response, body=b"")
        return response

    async def _next_request(
        self, stream: trio.abc.Stream, parser: _RequestParser
    ) -> tuple[Request, bool] | None:
        """The next whole request and whether its client keeps the connection open, or
        None when the client (or shutdown) ends the connection or a head or body stalls
        past its timeout. The keep-alive wait starts
        at the end of the previous request; the head has HEADER_TIMEOUT from its first
        byte, the body BODY_TIMEOUT from the end of the head."""
        deadline = trio.current_time() + (
            HEADER_TIMEOUT if parser.in_message else KEEP_ALIVE_TIMEOUT
        )
        body_deadline = None
        while not parser.ready:
            if parser.failure is not None:
                raise parser.failure
            if parser.ends_after_ready:
                return None
            waiting_for_first_byte = not parser.in_message
            if waiting_for_first_byte and self._closing:
                return None
            if parser.head_done and parser.in_message and body_deadline is None:
                body_deadline = deadline = trio.current_time() + BODY_TIMEOUT
            with trio.CancelScope(deadline=deadline) as wait:
                if waiting_for_first_byte:
                    self._idle_scopes.add(wait)
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                finally:
                    self._idle_scopes.discard(wait)
            if wait.cancelled_caught or not data:
                return None
            if waiting_for_first_byte:
                deadline = trio.current_time() + HEADER_TIMEOUT
            parser.feed(bytes(data))
        return parser.ready.popleft()

    async def _send_error(
        self, stream: trio.abc.Stream, status: int, code: str, message: str
    ) -> None:
        """Best effort: the connection is in trouble and closes after this."""
        try:
            with trio.move_on_after(1):
                await stream.send_all(_encode(error_response(status, code, message), False))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _encode(response: Response, keep_alive: bool) -> bytes:
    """Status line, headers and body in one buffer, for one write."""
    try:
        reason = http.HTTPStatus(response.status).phrase
    except ValueError:
        reason = ""
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"content-type: {response.content_type}",
        f"content-length: {len(response.body)}",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + response.body
