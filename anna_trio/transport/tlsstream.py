"""A TLS stream for one request/response connection at a time, on `ssl.MemoryBIO`.

trio.SSLStream is general: it lets one task send while another receives, so each call
goes through conflict detectors, a handshake event, a lock and a retry loop that can
park behind the other direction. Our HTTP server and client never use a connection from
two tasks at once (each request is sent, then its answer read), and every peer message
and every probe pays the TLS layer twice on each end: about 8 µs of Python per call on
top of OpenSSL's own work (30 of 80 µs of an in-process exchange). This stream does
the same OpenSSL calls without that machinery.

Its behaviour is trio.SSLStream's with `https_compatible=True`, which the server and
client used before: an EOF without close_notify reads as an EOF, `aclose` does not wait
for the peer's close_notify, a TLS failure is a `trio.BrokenResourceError` whose
`__cause__` is the `ssl.SSLError`, and a TLS 1.3 server holds back its session tickets
until its first write. One difference: a handshake that fails sends its alert first, so
the peer learns why (an unknown CA, a missing certificate) instead of seeing a close.
"""

from __future__ import annotations

import contextlib
import enum
import ssl

import trio

RECEIVE_SIZE = 64 * 1024


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class TlsStream(trio.abc.Stream):
    """TLS over `transport`; call `do_handshake` first, then use it from one task at a time.

    `receive_size` bounds what one read takes from the transport (and so what waits
    undecrypted in memory): a server holding many connections keeps it small."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        receive_size: int = RECEIVE_SIZE,
    ) -> None:
        self.transport_stream = transport
        self._receive_size = receive_size
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._state = _State.OK
        self._handshake_done = False

    async def do_handshake(self) -> None:
        """Run the handshake; a refusal either way is BrokenResourceError from the SSLError."""
        self._check_usable()
        while True:
            try:
                self.ssl_object.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except (ssl.SSLError, ssl.CertificateError) as exc:
                # The alert tells the peer why; best effort, it may already be gone.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._flush()
                self._state = _State.BROKEN
                raise trio.BrokenResourceError from exc
            break
        self._handshake_done = True
        if not (self.ssl_object.server_side and self.ssl_object.version() == "TLSv1.3"):
            # A TLS 1.3 server's handshake ends with session tickets only: they leave with
            # the first answer, not now, while the client may be sending (trio issue 819).
            await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted bytes, at most `max_bytes`; b"" at EOF, with close_notify (which
        `SSLObject.read` reports as b"") or without (the SSLEOFError below)."""
        self._check_ready()
        size = self._receive_size if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        while True:
            try:
                data = self.ssl_object.read(size)
            except ssl.SSLWantReadError:
                await self._fill()
                continue
            except ssl.SSLEOFError:
                return b""  # the peer closed without close_notify: HTTP frames its own ends
            except ssl.SSLError as exc:
                self._state = _State.BROKEN
                raise trio.BrokenResourceError from exc
            if self._outgoing.pending:
                await self._flush()  # held-back tickets, or a KeyUpdate answer the read wrote
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of `data`; cancelled midway, the stream is broken."""
        self._check_ready()
        if not data:
            await trio.lowlevel.checkpoint()
            return
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as exc:
            self._state = _State.BROKEN
            raise trio.BrokenResourceError from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_usable()
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the transport without waiting for the peer's close_notify."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        self._state = _State.CLOSED
        await self.transport_stream.aclose()

    def _check_usable(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("the TLS stream is broken")

    def _check_ready(self) -> None:
        self._check_usable()
        if not self._handshake_done:
            raise RuntimeError("do_handshake() must finish before the stream carries data")

    async def _flush(self) -> None:
        if not self._outgoing.pending:
            return
        try:
            await self.transport_stream.send_all(self._outgoing.read())
        except BaseException:
            # Part of a TLS record may have left: nothing after it can be sent intact.
            self._state = _State.BROKEN
            raise

    async def _fill(self) -> None:
        try:
            data = await self.transport_stream.receive_some(self._receive_size)
        except trio.BrokenResourceError:
            self._state = _State.BROKEN
            raise
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
