"""A lean HTTP/1.1 server: httptools (llhttp, Node's C parser) over trio streams,
keep-alive, pipelining, TLS, graceful drain, and bounds on what a client may take.

Replaces quart-trio on hypercorn for the RPC listener. Measured on the 2-core dev
machine: one small request cost the daemon ~1.5 ms of CPU through quart and hypercorn
(over half of a node's CPU in a round); through h11 ~0.26 ms, of which h11's
pure-Python parsing and framing were ~40 µs — llhttp does the same in ~2 µs. A
request is parsed in C and answered in one write.

Routing and policy (rate limits, who may call what, JSON bodies) live in the handler;
this module moves bytes and bounds them:

- connections in total, per source address and by class, validators with a reserve of
  their own (`admission.py`), and TLS handshakes in progress, each under its timeout;
  outsiders' requests are answered a few at a time, so however many pipeline, a
  validator's request is not queued behind all of them;
- a request head gets HEADER_TIMEOUT from its first byte, a body BODY_TIMEOUT from the
  end of the head, an idle connection `keep_alive_timeout` from the end of its last
  answer (or its opening) — bytes that start no request, such as a `\\r\\n` every few
  seconds, do not extend it;
- an answer that the client does not read within `send_timeout` closes the
  connection, and pipelined requests are parsed one by one as they are answered, so a
  client that never reads holds one answer and at most one read of raw bytes; after
  an answer with `Retry-After` (429, 503) an outsider's connection is not read for
  that long;
- a body over the limit is refused from its Content-Length, before it is read (also
  after `Expect: 100-continue`, which is otherwise answered `100 Continue` before the
  body is read); malformed HTTP, including a repeated Host, Content-Length or
  Idempotency-Key header, is a 400;
- accept errors that mean "out of file descriptors or memory" pause accepting, as
  trio's serve_listeners does; at shutdown, idle connections close and requests in
  flight finish.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import http
import json
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import attrs
import httptools
import trio

from .admission import AdmissionLimits, ConnectionTable, Counts, Refusal, Slot
from .refusals import RefusalLog
from .tlsfailure import classify_tls_failure
from .tlsstream import TlsStream

log = logging.getLogger("anna.http")

MAX_HEADER_BYTES = 16 * 1024
# One read per connection at a time: what a client that pipelines and never reads can
# make this server hold, besides one answer (a TLS record is at most 16 KiB + 256).
RECEIVE_SIZE = 16 * 1024 + 256
FEED_SIZE = 1024  # bytes of heads parsed at a time (see _RequestParser)
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 10.0
ERROR_SEND_TIMEOUT = 1.0
ACCEPT_CAPACITY_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}  # as trio.serve_listeners
)
ACCEPT_BACKOFF = 0.1
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
SINGLE_HEADERS = frozenset({"host", "content-length", "idempotency-key"})
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with RST, no TIME_WAIT

# What `count_error` is told: a request refused as malformed HTTP (400) or for its body
# size (413), and a failure of ours (a 500, or a connection closed by an error).
MALFORMED, TOO_LARGE, INTERNAL = "malformed", "too_large", "internal"
# What `count_dropped` is told besides a Refusal's value: why an admitted connection was
# closed before the client was done with it.
SEND_TIMEOUT, SLOW_REQUEST = "send_timeout", "slow_request"
DROP_REASONS = (*(refusal.value for refusal in Refusal), SEND_TIMEOUT, SLOW_REQUEST)


class ServerLimits(AdmissionLimits, Protocol):
    """What the server reads from its settings (peers.yml `limits:` in annad), at each
    connection and request, so a reload applies to the next ones."""

    @property
    def max_body_bytes(self) -> int: ...
    @property
    def handshake_timeout(self) -> float: ...
    @property
    def send_timeout(self) -> float: ...
    @property
    def keep_alive_timeout(self) -> float: ...
    @property
    def max_outsider_requests(self) -> int: ...


class Trust(Protocol):
    """Who counts as a validator for the connection limits: before the TLS handshake by
    source address, after it by the client certificate's CN."""

    def trusted_address(self, address: str) -> bool: ...

    def trusted_name(self, name: str) -> bool: ...


class TrustEveryone:
    """Every client in the trusted class: only the totals bound it (the metrics port)."""

    def trusted_address(self, address: str) -> bool:
        return True

    def trusted_name(self, name: str) -> bool:
        return True


@attrs.frozen
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client: str  # the source address
    peer_name: str | None = None  # the verified client certificate's CN (TLS only)


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


def json_response(status: int, body: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, json.dumps(body, separators=(",", ":")).encode(), headers=headers)


def error_response(
    status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    return json_response(status, {"success": False, "error": code, "message": message}, headers)


class _BodyTooLarge(Exception):
    pass


class _Malformed(Exception):
    pass


class _RequestParser:
    """Feeds one connection's bytes to llhttp; a completed request waits in `ready`.

    Heads are parsed FEED_SIZE bytes at a time, a body of known length in one go to its
    end, and parsing stops at the end of a request, so the pipelined requests behind it
    stay raw bytes until it is answered: a client that pipelines a read full of tiny
    requests and never reads its answers makes at most a slice of them into Request
    objects.

    Limits are enforced by raising from a callback, which stops llhttp at once: a body
    over the limit is refused from its Content-Length and never buffered, and a head
    never grows past MAX_HEADER_BYTES (plus one slice, for a head that never ends)."""

    def __init__(
        self,
        client: str,
        peer_name: str | None,
        max_body: int,
        clock: Callable[[], float],
    ) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._client = client
        self._peer_name = peer_name
        self._max_body = max_body
        self._clock = clock
        self.ready: collections.deque[tuple[Request, bool]] = collections.deque()  # keep-alive?
        self.failure: Exception | None = None  # raised once the ready requests are answered
        self.ends_after_ready = False  # an upgrade or CONNECT: answer what came, then close
        self.unparsed = memoryview(b"")
        self.in_message = False
        self.head_done = False
        self.began_at = self.head_done_at = 0.0
        self.expects_continue = False  # the client waits for `100 Continue` to send its body
        self._fed_in_head = 0
        self._head_size = 0
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._body_left: int | None = None  # of a body with a Content-Length, once its head is in

    def feed(self, data: bytes | bytearray) -> None:
        """Take one read's bytes and parse them up to the end of the next request."""
        self.unparsed = memoryview(data)
        self.advance()

    def advance(self) -> None:
        """Parse on until a request is ready, an error, or the end of what was read."""
        while self.unparsed and not self.ready and not self._stopped:
            size = FEED_SIZE if self._body_left is None else max(self._body_left, 1)
            chunk, self.unparsed = self.unparsed[:size], self.unparsed[size:]
            self._feed(chunk)
        if self._stopped:
            self.unparsed = memoryview(b"")

    @property
    def _stopped(self) -> bool:
        return self.failure is not None or self.ends_after_ready

    def _feed(self, data: memoryview) -> None:
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
        self.in_message, self.head_done, self.expects_continue = True, False, False
        self.began_at = self._clock()
        self._fed_in_head = self._head_size = self._body_size = 0
        self._url, self._headers, self._body, self._body_left = b"", {}, [], None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1").strip()
        self._count_head(len(name) + len(value) + 4)
        known = self._headers.get(key)
        if known is None:
            self._headers[key] = text
        elif key in SINGLE_HEADERS:
            raise _Malformed(f"repeated {key} header")
        else:
            self._headers[key] = f"{known}, {text}"  # RFC 9110 5.3: a list, in order

    def on_headers_complete(self) -> None:
        self.head_done, self.head_done_at = True, self._clock()
        http_1_1 = self._parser.get_http_version() == "1.1"
        if http_1_1 and "host" not in self._headers:
            raise _Malformed("an HTTP/1.1 request needs a Host header")
        length = self._headers.get("content-length")
        if length is not None:
            if int(length) > self._max_body:  # llhttp checked the digits
                raise _BodyTooLarge
            self._body_left = int(length)
        # RFC 9110 10.1.1: an HTTP/1.0 client's expectation is ignored.
        self.expects_continue = (
            http_1_1 and self._headers.get("expect", "").lower() == "100-continue"
        )

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_left is not None:
            self._body_left -= len(body)
        if self._body_size > self._max_body:
            raise _BodyTooLarge
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.in_message = self.expects_continue = False
        self._body_left = None
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
            peer_name=self._peer_name,
        )
        self.ready.append((request, self._parser.should_keep_alive()))

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > MAX_HEADER_BYTES:
            raise _Malformed(f"request head over {MAX_HEADER_BYTES} bytes")


DRAIN_BYTES = 4 * 1024 * 1024
DRAIN_SECONDS = 2.0


async def _linger(tcp: trio.SocketStream) -> None:
    """After a last answer (Connection: close, HTTP/1.0, a 400 or 413) while the client
    may still be sending: end our side, then read and drop what comes for a moment.
    Closing with unread bytes would reset the connection, and a reset can destroy the
    answer before the client has read it (Apache's lingering close)."""
    received = 0
    with (
        trio.move_on_after(DRAIN_SECONDS),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await tcp.send_eof()
        while received < DRAIN_BYTES:
            data = await tcp.receive_some(RECEIVE_SIZE)
            if not data:
                return
            received += len(data)


def _common_name(ssl_object: ssl.SSLObject) -> str | None:
    """The CN of the client certificate the handshake verified, if any."""
    certificate: Any = ssl_object.getpeercert() or {}
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _Dropped(Exception):
    """This connection is closed by a bound (the reason is counted where it is raised)."""


class HttpServer:
    """Serves `handler` on one listener until `shutdown()`; owns its connections."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: Callable[[], ServerLimits],
        ssl_context: ssl.SSLContext | None = None,
        trust: Trust | None = None,
        count_error: Callable[[str], None] = lambda kind: None,
        count_dropped: Callable[[str], None] = lambda reason: None,
        on_tls_failure: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._ssl = ssl_context
        self._trust: Trust = trust if trust is not None else TrustEveryone()
        self._count_error = count_error
        self._count_dropped = count_dropped
        self._on_tls_failure = on_tls_failure
        self._refusals = RefusalLog(log)
        self._table = ConnectionTable()
        self._outsider_turns = trio.CapacityLimiter(1)
        self._closing = False
        self._idle_scopes: set[trio.CancelScope] = set()
        self._listeners: list[trio.SocketListener] = []

    def statistics(self) -> Counts:
        """Open connections by class and TLS handshakes in progress, now."""
        return self._table.statistics()

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report the bound port, serve until shutdown() and the drain finish."""
        self._listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as connections:
            connections.start_soon(self._accept_loop, connections)
            task_status.started(self._listeners[0].socket.getsockname()[1])

    async def _accept_loop(self, connections: trio.Nursery) -> None:
        async with trio.open_nursery() as acceptors:
            for listener in self._listeners:
                acceptors.start_soon(self._accept, listener, connections)

    async def _accept(self, listener: trio.SocketListener, connections: trio.Nursery) -> None:
        while not self._closing:
            try:
                tcp = await listener.accept()
            except trio.ClosedResourceError:
                return  # shutdown() closed the listener
            except OSError as exc:
                if self._closing:
                    return
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept failed (%s); pausing %.0f ms", exc, ACCEPT_BACKOFF * 1000)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            slot = self._admit(tcp)
            if slot is not None:
                connections.start_soon(self._connection, tcp, slot)

    def _admit(self, tcp: trio.SocketStream) -> Slot | None:
        """A slot for the new connection, or close it at once (with a reset: a flood
        leaves no TIME_WAIT sockets behind) and count why."""
        try:
            address = str(tcp.socket.getpeername()[0])
        except OSError:  # reset before we looked
            tcp.socket.close()
            return None
        slot = self._table.admit(
            address,
            trusted=self._trust.trusted_address(address),
            handshake=self._ssl is not None,
            limits=self._limits(),
        )
        if isinstance(slot, Refusal):
            self._count_dropped(slot.value)
            with contextlib.suppress(OSError):
                tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            tcp.socket.close()
            return None
        return slot

    async def shutdown(self) -> None:
        """Stop accepting, close idle connections; requests in flight run to completion."""
        self._closing = True
        for listener in self._listeners:
            await listener.aclose()
        for scope in list(self._idle_scopes):
            scope.cancel()

    async def _connection(self, tcp: trio.SocketStream, slot: Slot) -> None:
        """One connection, whatever happens on it: an error of ours here (the parser,
        the TLS layer, an answer that cannot be encoded) is logged with its traceback,
        counted, and closes this connection only; the listener and the others go on."""
        try:
            stream, peer_name = await self._open(tcp, slot)
            if stream is not None and await self._serve_requests(stream, slot, peer_name):
                await _linger(tcp)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Dropped):
            pass
        except Exception:
            log.exception("internal error on a connection; closing it")
            self._count_error(INTERNAL)
        finally:
            self._table.release(slot)
            await trio.aclose_forcefully(tcp)

    async def _open(
        self, tcp: trio.SocketStream, slot: Slot
    ) -> tuple[trio.abc.Stream | None, str | None]:
        """The stream to serve and the client's verified CN; (None, None) when the TLS
        handshake fails, takes too long, or shows an outsider past its limits."""
        if self._ssl is None:
            return tcp, None
        limits = self._limits()
        tls = TlsStream(tcp, self._ssl, server_side=True, receive_size=RECEIVE_SIZE)
        with trio.move_on_after(limits.handshake_timeout) as deadline:
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                if isinstance(exc.__cause__, ssl.SSLError):
                    reason = classify_tls_failure(exc)
                    self._on_tls_failure(reason)
                    self._refuse("tls", f"TLS handshake from {slot.address} failed: {reason}")
                return None, None
        if deadline.cancelled_caught:
            self._on_tls_failure("timeout")
            self._refuse("tls", f"TLS handshake from {slot.address} not done in time")
            return None, None
        peer_name = _common_name(tls.ssl_object)
        trusted = peer_name is not None and self._trust.trusted_name(peer_name)
        refusal = self._table.handshake_done(slot, trusted=trusted, limits=limits)
        if refusal is not None:
            self._count_dropped(refusal.value)
            return None, None
        return tls, peer_name

    async def _serve_requests(
        self, stream: trio.abc.Stream, slot: Slot, peer_name: str | None
    ) -> bool:
        """Answer requests until the connection ends; whether it ended with an answer
        that said so (the client may still be sending: linger), not with the client
        gone, quiet past a deadline, or shutdown."""
        limits = self._limits()
        parser = _RequestParser(slot.address, peer_name, limits.max_body_bytes, trio.current_time)
        while True:
            idle_deadline = trio.current_time() + limits.keep_alive_timeout
            try:
                ready = await self._next_request(stream, parser, idle_deadline)
            except _Malformed as exc:
                self._count_error(MALFORMED)
                self._refuse(MALFORMED, f"malformed HTTP from {slot.address}: {exc}")
                await self._send_error(stream, 400, "bad_request", f"malformed HTTP: {exc}")
                return True
            except _BodyTooLarge:
                self._count_error(TOO_LARGE)
                limit = limits.max_body_bytes
                self._refuse(TOO_LARGE, f"a body over {limit} bytes from {slot.address}")
                await self._send_error(stream, 413, "payload_too_large", f"body over {limit} bytes")
                return True
            if ready is None:
                return False
            request, keep_alive = ready
            async with self._turn(slot):
                response = await self._answer(request)
                keep_alive = keep_alive and not self._closing
                answer = _encode(response, keep_alive, body=request.method != "HEAD")
            await self._send(stream, answer)
            if not keep_alive:
                return True
            if not slot.trusted:
                await self._hold_off(_retry_after(response), limits)

    @contextlib.asynccontextmanager
    async def _turn(self, slot: Slot) -> AsyncIterator[None]:
        """Outsiders' requests are answered `max_outsider_requests` at a time: however
        many outsiders pipeline, only that many of their tasks are ready to run at once,
        so a validator's request waits for a few of theirs, not for all of them."""
        if slot.trusted:
            yield
            return
        self._outsider_turns.total_tokens = self._limits().max_outsider_requests
        async with self._outsider_turns:
            yield

    async def _hold_off(self, seconds: float, limits: ServerLimits) -> None:
        """After an answer to an outsider that says `Retry-After` (429, 503), read
        nothing more from its connection for that long (at most the keep-alive timeout):
        a client that pipelines past its rate limit costs one answer per Retry-After,
        not one per request it queued. (A validator's connection carries other work,
        and its own client honours the answer.) Shutdown ends the wait, as it ends
        any idle wait."""
        if seconds <= 0:
            return
        with trio.move_on_after(min(seconds, limits.keep_alive_timeout)) as wait:
            self._idle_scopes.add(wait)
            try:
                await trio.sleep_forever()
            finally:
                self._idle_scopes.discard(wait)

    def _refuse(self, kind: str, message: str) -> None:
        """Log refused input (a flood of it at most once per kind every few seconds)."""
        self._refusals.note(kind, message, trio.current_time())

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> None:
        """Send all of `data`, or drop the connection of a client that does not read it
        within `send_timeout`."""
        with trio.move_on_after(self._limits().send_timeout) as deadline:
            await stream.send_all(data)
        if deadline.cancelled_caught:
            self._count_dropped(SEND_TIMEOUT)
            raise _Dropped

    async def _answer(self, request: Request) -> Response:
        """The listener outlives any handler: an unexpected exception is a logged 500, not
        the end of the daemon."""
        try:
            response = await self._handler(request)
        except Exception:
            log.exception("unhandled error answering %s %s", request.method, request.path)
            self._count_error(INTERNAL)
            response = error_response(500, "internal_error", "internal server error")
        return response

    async def _next_request(
        self, stream: trio.abc.Stream, parser: _RequestParser, idle_deadline: float
    ) -> tuple[Request, bool] | None:
        """The next whole request and whether its client keeps the connection open, or
        None when the client (or shutdown) ends the connection or it stays idle past
        `idle_deadline`. A head has HEADER_TIMEOUT from its first byte, a body
        BODY_TIMEOUT from the end of its head; a head or body that stalls past it is
        dropped."""
        parser.advance()  # pipelined bytes behind the request just answered
        while not parser.ready:
            if parser.failure is not None:
                raise parser.failure
            if parser.ends_after_ready:
                return None
            idle = not parser.in_message
            if idle:
                if self._closing:
                    return None
                deadline = idle_deadline
            elif not parser.head_done:
                deadline = parser.began_at + HEADER_TIMEOUT
            else:
                deadline = parser.head_done_at + BODY_TIMEOUT
                if parser.expects_continue:
                    parser.expects_continue = False
                    await self._send(stream, CONTINUE)
            with trio.CancelScope(deadline=deadline) as wait:
                if idle:
                    self._idle_scopes.add(wait)
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                finally:
                    self._idle_scopes.discard(wait)
            if wait.cancelled_caught:
                if not idle:
                    self._count_dropped(SLOW_REQUEST)
                return None
            if not data:
                return None
            parser.feed(data)
        return parser.ready.popleft()

    async def _send_error(
        self, stream: trio.abc.Stream, status: int, code: str, message: str
    ) -> None:
        """Best effort: the connection is in trouble and closes after this."""
        try:
            with trio.move_on_after(ERROR_SEND_TIMEOUT):
                await stream.send_all(_encode(error_response(status, code, message), False))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _retry_after(response: Response) -> float:
    """The seconds of a `Retry-After: N` header (0 without one, or for a date)."""
    for name, value in response.headers:
        if name.lower() == "retry-after":
            with contextlib.suppress(ValueError):
                return max(0.0, float(value))
    return 0.0


def _encode(response: Response, keep_alive: bool, *, body: bool = True) -> bytes:
    """Status line, headers and body in one buffer, for one write. An answer to HEAD
    (`body=False`) has the headers GET's would have, Content-Length included, and no
    body (RFC 9110 §9.3.2)."""
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
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (response.body if body else b"")
