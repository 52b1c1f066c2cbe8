"""TlsStream: the TLS layer under our HTTP server and client, over trio's in-memory
stream pairs on the autojump clock (a stuck handshake or read fails the test's
`fail_after` instead of hanging), and against trio.SSLStream for interoperability."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from anna_trio import pki, tls
from anna_trio.models import TlsConfig
from anna_trio.transport.tlsstream import TlsStream

HOST = "127.0.0.1"


@attrs.frozen
class Contexts:
    server: ssl.SSLContext
    client: ssl.SSLContext
    anonymous_client: ssl.SSLContext  # trusts the CA, presents no certificate
    stranger_client: ssl.SSLContext  # trusts another CA only
    ca: Path
    cert: Path
    key: Path

    def client_up_to(self, version: ssl.TLSVersion) -> ssl.SSLContext:
        """A client with our node certificate that offers at most `version`."""
        context = _client(self.ca, self.cert, self.key)
        context.maximum_version = version
        return context


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> Contexts:
    root = tmp_path_factory.mktemp("tlsstream")
    pki.init_ca(root / "ca")
    pki.init_ca(root / "other")
    pki.issue_cert(root / "ca", node_id="node_001", sans=[HOST], out_dir=root / "n1")
    ca, cert, key = (
        root / "ca" / pki.CA_CERT_NAME,
        root / "n1" / "node_001.pem",
        root / "n1" / "node_001.key",
    )
    config = TlsConfig(
        enabled=True,
        ca_cert=ca,
        server_cert=cert,
        server_key=key,
        client_cert=cert,
        client_key=key,
    )
    return Contexts(
        server=tls.server_context(config),
        client=tls.client_context(config),
        anonymous_client=ssl.create_default_context(cafile=ca),
        stranger_client=_client(root / "other" / pki.CA_CERT_NAME, cert, key),
        ca=ca,
        cert=cert,
        key=key,
    )


def _client(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(cert, key)
    return context


async def _handshake_both(*streams: TlsStream | trio.SSLStream[Any]) -> None:
    async with trio.open_nursery() as nursery:
        for stream in streams:
            nursery.start_soon(stream.do_handshake)


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    chunks, received = [], 0
    while received < size:
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {received} of {size} bytes"
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def _pair(
    contexts: Contexts,
    client_context: ssl.SSLContext | None = None,
    make_pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = (
        trio.testing.memory_stream_pair
    ),
) -> tuple[TlsStream, TlsStream]:
    client_transport, server_transport = make_pair()
    server = TlsStream(server_transport, contexts.server, server_side=True)
    client = TlsStream(
        client_transport,
        client_context or contexts.client,
        server_side=False,
        server_hostname=HOST,
    )
    return server, client


@asynccontextmanager
async def _connected(
    contexts: Contexts, **pair_options: Any
) -> AsyncIterator[tuple[TlsStream, TlsStream]]:
    """A handshaken (server, client) pair; the body runs under the same 30 s bound."""
    server, client = _pair(contexts, **pair_options)
    with trio.fail_after(30):
        await _handshake_both(server, client)
        yield server, client


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_large_messages_cross_both_ways_intact(
    contexts: Contexts, version: ssl.TLSVersion, autojump_clock: trio.testing.MockClock
) -> None:
    """Messages spanning many TLS records arrive whole, under TLS 1.2 (whose server ends
    the handshake and must send its Finished at once) and TLS 1.3 (whose server holds
    its tickets back until its first write)."""
    server, client = _pair(contexts, contexts.client_up_to(version))
    request, answer = bytes(range(256)) * 4096, b"answer" * 200_000
    with trio.fail_after(30):
        await _handshake_both(server, client)
        assert client.ssl_object.version() == version.name.replace("v1_", "v1.")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, request)
            assert await _receive_exactly(server, len(request)) == request
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, answer)
            assert await _receive_exactly(client, len(answer)) == answer


@pytest.mark.parametrize("ours", ["server", "client"])
async def test_talks_to_trio_sslstream(
    contexts: Contexts, ours: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Either end may be trio.SSLStream: the bytes on the wire are plain TLS."""
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server: TlsStream | trio.SSLStream[Any]
    client: TlsStream | trio.SSLStream[Any]
    if ours == "server":
        server = TlsStream(server_transport, contexts.server, server_side=True)
        client = trio.SSLStream(client_transport, contexts.client, server_hostname=HOST)
    else:
        server = trio.SSLStream(server_transport, contexts.server, server_side=True)
        client = TlsStream(
            client_transport, contexts.client, server_side=False, server_hostname=HOST
        )
    with trio.fail_after(30):
        await _handshake_both(server, client)
        for n in range(3):
            await client.send_all(b"ping %d" % n)
            assert await server.receive_some() == b"ping %d" % n
            await server.send_all(b"pong %d" % n)
            assert await client.receive_some() == b"pong %d" % n


async def test_eof_without_close_notify_reads_as_eof(
    contexts: Contexts, autojump_clock: trio.testing.MockClock
) -> None:
    async with _connected(contexts) as (server, client):
        await client.send_all(b"last words")
        await client.transport_stream.aclose()
        assert await server.receive_some() == b"last words"
        assert await server.receive_some() == b""
        assert await server.receive_some() == b""


async def test_close_notify_reads_as_eof(
    contexts: Contexts, autojump_clock: trio.testing.MockClock
) -> None:
    client_transport, server_transport = trio.testing.memory_stream_pair()
    server = TlsStream(server_transport, contexts.server, server_side=True)
    client = trio.SSLStream(client_transport, contexts.client, server_hostname=HOST)
    with trio.fail_after(30):
        await _handshake_both(server, client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose)  # sends close_notify, waits for ours
            assert await server.receive_some() == b""
            await server.aclose()
            await client_transport.aclose()


async def test_a_refused_client_certificate_reaches_the_client_as_an_alert(
    contexts: Contexts, autojump_clock: trio.testing.MockClock
) -> None:
    """Under TLS 1.3 the client's handshake ends before the server checks its
    certificate; the server's alert tells the client why, where a bare close would not."""
    server, client = _pair(contexts, contexts.anonymous_client)
    server_error: list[BaseException] = []

    async def serve() -> None:
        with pytest.raises(trio.BrokenResourceError) as caught:
            await server.do_handshake()
        server_error.append(caught.value.__cause__ or caught.value)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.do_handshake()
            await client.send_all(b"GET / HTTP/1.1\r\n\r\n")
            with pytest.raises(trio.BrokenResourceError) as refused:
                await client.receive_some()
    assert isinstance(server_error[0], ssl.SSLError)
    cause = refused.value.__cause__
    assert isinstance(cause, ssl.SSLError)
    assert "ALERT" in (cause.reason or ""), cause
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"more")


async def test_an_untrusted_server_fails_the_client_handshake(
    contexts: Contexts, autojump_clock: trio.testing.MockClock
) -> None:
    server, client = _pair(contexts, contexts.stranger_client)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await server.do_handshake()

            nursery.start_soon(serve)
            with pytest.raises(trio.BrokenResourceError) as caught:
                await client.do_handshake()
    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)


async def test_garbage_after_the_handshake_breaks_the_stream(
    contexts: Contexts, autojump_clock: trio.testing.MockClock
) -> None:
    async with _connected(contexts) as (server, client):
        await client.transport_stream.send_all(b"\x17\x03\x03\x00\x05hello")
        with pytest.raises(trio.BrokenResourceError) as caught:
            await server.receive_some()
    assert isinstance(caught.value.__cause__, ssl.SSLError)
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()


async def test_a_cancelled_send_breaks_the_stream(
    contexts: Contexts, autojump_clock: trio.testing.MockClock
) -> None:
    """Part of a record may have left: later sends must not follow it as if whole."""
    async with _connected(contexts, make_pair=trio.testing.lockstep_stream_pair) as (_, client):
        with trio.move_on_after(1) as waited:
            await client.send_all(b"x" * 100_000)  # nobody reads: the lockstep send blocks
    assert waited.cancelled_caught
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"y")


async def test_closed_and_unready_streams_refuse_use(
    contexts: Contexts, autojump_clock: trio.testing.MockClock
) -> None:
    server, client = _pair(contexts)
    with pytest.raises(RuntimeError, match="do_handshake"):
        await client.send_all(b"too early")
    with trio.fail_after(30):
        await _handshake_both(server, client)
    with pytest.raises(ValueError, match="max_bytes"):
        await server.receive_some(0)
    await client.aclose()
    await client.aclose()  # closing twice is fine
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"after close")
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()
