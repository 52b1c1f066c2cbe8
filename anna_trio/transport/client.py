"""Node-to-node HTTP/1.1 client: httptools (llhttp) over trio streams, one kept-alive
connection per peer.

Why not httpx: measured at about 0.8–1.0 ms of CPU per request against about 0.15 ms
here (benchmarks/bench_client.py), and peer traffic sits on the round's hot path; h11
took ~35 µs of that to frame and parse, llhttp takes ~2. A new mTLS connection costs
about 5 ms, so the connection is kept alive and reopened on demand.

    PeerError                    (anna_trio._exceptions)
    └── PeerConnectionError      connect, handshake, I/O or HTTP framing failed
        └── PeerTLSError         handshake failed or the peer's certificate was refused
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import httptools
import trio

from anna_trio._exceptions import PeerError

from .tlsfailure import classify_tls_failure, failure_label
from .tlsstream import TlsStream

__all__ = [
    "HttpClient",
    "PeerConnectionError",
    "PeerTLSError",
    "Response",
]

_RECEIVE_SIZE = 65536

# What RFC 9110 lets a request carry, as llhttp enforces it on our server: a token method
# and header name, a target of visible characters, a value of visible characters (and
# obs-text) with inner spaces and tabs only.
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?")


class PeerConnectionError(PeerError):
    """Raised when connecting to a peer, the TLS handshake, I/O or HTTP framing fails."""


class PeerTLSError(PeerConnectionError):
    """Raised when the TLS handshake fails or the peer's certificate is refused.

    `reason` says why: one of `tlsfailure.TLS_FAILURE_REASONS` (``unknown_ca``,
    ``certificate_expired``, ``rejected_by_peer`` …), or what `verify_peer` returned,
    whose kind before any colon is such a label.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(f"{message} [{reason}]")
        self.reason = reason


@attrs.frozen
class Response:
    """A complete HTTP response from a peer."""

    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        """Decode the body as JSON; a peer answering junk is a PeerError."""
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser
            raise PeerError("invalid JSON from peer") from exc


class _PeerClosedIdleConnection(Exception):
    """The peer closed a reused keep-alive connection before sending any response byte."""


class HttpClient:
    """One keep-alive HTTP/1.1 connection to one peer, reopened on demand.

    Not for concurrent use: one request at a time (the peer task serialises). Timeouts
    belong to the caller (``trio.fail_after`` around `request`); on cancellation
    mid-request the connection is closed, since it may be half-used.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        verify_peer: Callable[[ssl.SSLObject], str | None] | None = None,
        max_response_bytes: int = 16 * 1024 * 1024,
        on_tls_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname if server_hostname is not None else host
        self._verify_peer = verify_peer
        self._max_response_bytes = max_response_bytes
        self._on_tls_failure = on_tls_failure
        host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._static_headers = [
            encode_header("host", host_header),
            encode_header("connection", "keep-alive"),
        ]
        self._socket_stream: trio.SocketStream | None = None
        self._stream: trio.abc.Stream | None = None

    @property
    def connected(self) -> bool:
        """Whether a connection is open (it may still turn out closed by the peer)."""
        return self._stream is not None

    async def aclose(self) -> None:
        """Close the connection; the next request opens a new one."""
        self._drop_connection()
        await trio.lowlevel.checkpoint()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request and read the whole response.

        Retries once on a fresh connection only when the peer had closed a reused
        keep-alive connection before answering; every other failure is raised.
        """
        if json_body is not None:
            payload = json.dumps(json_body, separators=(",", ":")).encode()
            extra = {"content-type": "application/json", **(headers or {})}
        else:
            payload = body if body is not None else b""
            extra = dict(headers or {})
        try:
            head = self._encode_head(method, path, len(payload), extra)
        except ValueError as exc:
            raise PeerConnectionError(f"cannot send {method} {path}: {exc}") from exc
        message = head + payload
        try:
            try:
                return await self._round_trip(message, method == "HEAD")
            except _PeerClosedIdleConnection:
                self._drop_connection()
                return await self._round_trip(message, method == "HEAD")
        except BaseException:
            # Failed or cancelled mid-request: the connection may be half-used.
            self._drop_connection()
            raise

    def _encode_head(
        self, method: str, target: str, length: int, headers: Mapping[str, str]
    ) -> bytes:
        """Request line and headers; ValueError for anything HTTP does not allow."""
        lines = [encode_request_line(method, target), *self._static_headers]
        lines.append(b"content-length: %d" % length)
        lines.extend(encode_header(name, value) for name, value in headers.items())
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _round_trip(self, message: bytes, head_request: bool) -> Response:
        reused = self._stream is not None
        if self._stream is None:
            self._stream = await self._connect()
        stream = self._stream
        reader = _ResponseReader(self._max_response_bytes, head_request)
        received_any = False
        try:
            await stream.send_all(message)
            while not reader.complete:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    if not received_any:
                        raise self._closed_before_answer(reused)
                    if reader.ends_at_eof():
                        break
                    raise PeerConnectionError(f"{self._address} closed the connection mid-response")
                received_any = True
                reader.feed(bytes(data))
        except _TooLarge:
            raise self._too_large() from None
        except PeerError:
            raise
        except (trio.BrokenResourceError, OSError) as exc:
            if not received_any and _is_connection_lost(exc):
                raise self._closed_before_answer(reused) from exc
            if not reused and isinstance(exc.__cause__, ssl.SSLError):
                # TLS 1.3: a peer refusing our certificate says so after our handshake ends.
                raise self._tls_failure(exc.__cause__, "refused the connection") from exc
            raise PeerConnectionError(f"connection to {self._address} failed: {exc!r}") from exc
        except httptools.HttpParserError as exc:
            raise PeerConnectionError(f"{self._address} broke HTTP/1.1: {exc}") from exc
        if not reader.reusable:
            # `Connection: close`, HTTP/1.0, a body framed by EOF or bytes past the answer.
            self._drop_connection()
        return Response(status=reader.status, headers=reader.headers, body=b"".join(reader.body))

    async def _connect(self) -> trio.abc.Stream:
        try:
            tcp = await trio.open_tcp_stream(self._host, self._port)
        except OSError as exc:
            raise PeerConnectionError(f"cannot connect to {self._address}: {exc}") from exc
        try:
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            if self._ssl_context is None:
                stream: trio.abc.Stream = tcp
            else:
                stream = await self._handshake(tcp, self._ssl_context)
        except BaseException:
            tcp.socket.close()
            raise
        self._socket_stream = tcp
        return stream

    async def _handshake(self, tcp: trio.SocketStream, context: ssl.SSLContext) -> TlsStream:
        tls = TlsStream(tcp, context, server_side=False, server_hostname=self._server_hostname)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            if isinstance(exc.__cause__, ssl.SSLError):
                raise self._tls_failure(exc.__cause__, "TLS handshake failed") from exc
            raise PeerConnectionError(
                f"TLS handshake with {self._address} failed: {exc!r}"
            ) from exc
        if self._verify_peer is not None:
            refusal = self._verify_peer(tls.ssl_object)
            if refusal is not None:
                self._report_tls_failure(failure_label(refusal))
                raise PeerTLSError(
                    f"{self._address} presented an unacceptable certificate", reason=refusal
                )
        return tls

    def _closed_before_answer(self, reused: bool) -> Exception:
        """The error for a connection closed or reset before any response byte arrived."""
        if reused:
            return _PeerClosedIdleConnection()
        if self._ssl_context is not None:
            # A trio/hypercorn server refusing our certificate under TLS 1.3 sends no
            # alert: it closes once our handshake has finished, before reading the request.
            self._report_tls_failure("closed_after_handshake")
            return PeerTLSError(
                f"{self._address} closed a new TLS connection before answering"
                " (most likely it refused our certificate)",
                reason="closed_after_handshake",
            )
        return PeerConnectionError(f"{self._address} closed the connection before answering")

    def _tls_failure(self, cause: ssl.SSLError, what: str) -> PeerTLSError:
        reason = classify_tls_failure(cause)
        self._report_tls_failure(reason)
        return PeerTLSError(f"{self._address}: {what}: {cause}", reason=reason)

    def _report_tls_failure(self, reason: str) -> None:
        if self._on_tls_failure is not None:
            self._on_tls_failure(reason)

    def _too_large(self) -> PeerConnectionError:
        return PeerConnectionError(
            f"response from {self._address} exceeds {self._max_response_bytes} bytes"
        )

    @property
    def _address(self) -> str:
        return f"{self._host}:{self._port}"

    def _drop_connection(self) -> None:
        """Close the socket at once: no TLS close_notify (https_compatible peers need none)."""
        if self._socket_stream is not None:
            self._socket_stream.socket.close()
        self._socket_stream = None
        self._stream = None


def encode_request_line(method: str, target: str) -> bytes:
    """`METHOD target HTTP/1.1`; ValueError unless the method is a token and the target
    visible ASCII."""
    raw_method, raw_target = method.encode("latin-1"), target.encode("latin-1")
    if not _TOKEN.fullmatch(raw_method) or not _TARGET.fullmatch(raw_target):
        raise ValueError(f"not a valid request line: {method!r} {target!r}")
    return raw_method + b" " + raw_target + b" HTTP/1.1"


def encode_header(name: str, value: str) -> bytes:
    """`name: value`; ValueError for a name that is not a token or a value with control
    characters or surrounding whitespace (and UnicodeEncodeError past latin-1)."""
    raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
    if not _TOKEN.fullmatch(raw_name) or not _FIELD_VALUE.fullmatch(raw_value):
        raise ValueError(f"not a valid header: {name!r}: {value!r}")
    return raw_name + b": " + raw_value


class _TooLarge(Exception):
    pass


class _ResponseReader:
    """llhttp callbacks for one response: status, headers (repeats joined with ", "), body.

    A body over the limit stops the parser from its Content-Length or as it streams. An
    answer to HEAD ends with its head (llhttp cannot know it has no body)."""

    def __init__(self, max_bytes: int, head_request: bool) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._max_bytes = max_bytes
        self._head_request = head_request
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self._size = 0
        self.complete = False
        self.reusable = False
        self._head_done = False

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _TooLarge):
                raise exc.__context__ from None
            raise
        except httptools.HttpParserUpgrade:
            self.reusable = False  # a 101 or CONNECT answer: never ours to reuse

    def ends_at_eof(self) -> bool:
        """Whether the peer's EOF ends this response: a body with no length and no chunks."""
        framed = "content-length" in self.headers or "transfer-encoding" in self.headers
        return self._head_done and not framed and self.status >= 200

    def on_message_begin(self) -> None:
        if self.complete:
            self.reusable = False  # the peer sent more than one answer: resynchronise

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1").strip()
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._head_done = True
        if self._head_request and self.status >= 200:
            self.on_message_complete()
            return
        length = self.headers.get("content-length")
        if length is not None and int(length) > self._max_bytes:  # llhttp checked the digits
            raise _TooLarge

    def on_body(self, body: bytes) -> None:
        if self.complete:  # after a HEAD answer's head: whatever follows is not ours
            return
        self._size += len(body)
        if self._size > self._max_bytes:
            raise _TooLarge
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.status < 200:  # 1xx: informational, the final answer follows
            self.headers, self._head_done = {}, False
            return
        if not self.complete:
            self.complete = True
            self.reusable = self._parser.should_keep_alive()


def _is_connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the peer closed or reset the connection (not a TLS or local error)."""
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    return isinstance(cause, ConnectionResetError | BrokenPipeError | ConnectionAbortedError)
