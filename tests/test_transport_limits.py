"""The lean server's connection bounds over real loopback sockets (attackers bind
127.0.0.2 and up, the "validator" is 127.0.0.1): outsiders in total and per address,
a reserve only validators may take, outsiders' TLS handshakes in progress, a
handshake's deadline, the client certificate's CN on the Request and as the judge of
who is a validator, and one label set for why a server-side handshake failed."""

from __future__ import annotations

import contextlib
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from anna_trio import pki as pki_tools
from anna_trio import tls
from anna_trio.models import Limits, TlsConfig
from anna_trio.transport.admission import Counts
from anna_trio.transport.server import HttpServer, Request, Response, json_response
from anna_trio.transport.tlsstream import TlsStream

VALIDATOR = "127.0.0.1"
LIMITS = Limits(
    max_connections=8,
    max_connections_per_address=2,
    validator_connection_reserve=3,
    max_pending_handshakes=2,
    handshake_timeout=2.0,
)
GET = b"GET /who HTTP/1.1\r\nhost: t\r\n\r\n"


@attrs.define
class Trusted:
    """Validators: 127.0.0.1 before the handshake, CN node_* after it."""

    def trusted_address(self, address: str) -> bool:
        return address == VALIDATOR

    def trusted_name(self, name: str) -> bool:
        return name.startswith("node_")


@attrs.define
class Served:
    port: int
    dropped: list[str]
    tls_failures: list[str]
    server: HttpServer


@contextlib.asynccontextmanager
async def serving(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Served]:
    async def who(request: Request) -> Response:
        return json_response(200, {"client": request.client, "peer_name": request.peer_name})

    dropped: list[str] = []
    failures: list[str] = []
    server = HttpServer(
        who,
        limits=lambda: LIMITS,
        ssl_context=ssl_context,
        trust=Trusted(),
        count_dropped=dropped.append,
        on_tls_failure=failures.append,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        try:
            yield Served(port, dropped, failures, server)
        finally:
            await server.shutdown()
            nursery.cancel_scope.cancel()


async def answer(stream: trio.abc.Stream) -> bytes:
    """One request's answer on `stream`; b"" when the server closed (or reset) it."""
    try:
        with trio.fail_after(5):
            await stream.send_all(GET)
            return bytes(await stream.receive_some(65536))
    except trio.BrokenResourceError:
        return b""


async def tcp_from(source: str, port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=source)


async def refusable_tcp_from(source: str, port: int) -> trio.SocketStream | None:
    """A connection, or None when the server's refusal (a reset) came before connect()
    returned."""
    try:
        return await tcp_from(source, port)
    except OSError:
        return None


async def test_outsiders_are_bounded_per_address_and_in_total_validators_keep_a_reserve() -> None:
    async with serving() as served, contextlib.AsyncExitStack() as streams:

        async def opened(source: str) -> bytes:
            stream = await refusable_tcp_from(source, served.port)
            if stream is None:
                return b""
            await streams.enter_async_context(stream)
            return await answer(stream)

        # Two per outsider address, five outsiders in all (8 slots, 3 kept back).
        assert [bool(await opened("127.0.0.2")) for _ in range(3)] == [True, True, False]
        assert served.dropped == ["address_limit"]
        assert [bool(await opened(f"127.0.0.{n}")) for n in (3, 3, 4, 4)] == [
            True,
            True,
            True,
            False,
        ]
        assert served.dropped == ["address_limit", "connection_limit"]
        # The validator takes the reserve, and not one slot more than the total.
        assert [bool(await opened(VALIDATOR)) for _ in range(4)] == [True, True, True, False]
        assert served.dropped[-1] == "connection_limit"
        counts = served.server.statistics()
        assert (counts.trusted, counts.others) == (3, 5)


async def test_a_closed_connection_gives_its_slot_back() -> None:
    async with serving() as served:
        for _ in range(5):
            async with await tcp_from("127.0.0.2", served.port) as stream:
                assert await answer(stream)
        await trio.sleep(0.1)
        assert served.server.statistics().others == 0
        assert served.dropped == []


# --- TLS ------------------------------------------------------------------------------


@attrs.define
class Pki:
    ca: Path
    certs: dict[str, tuple[Path, Path]]

    def server_context(self) -> ssl.SSLContext:
        cert, key = self.certs["node_001"]
        return tls.server_context(
            TlsConfig(
                enabled=True,
                ca_cert=self.ca / "ca.pem",
                server_cert=cert,
                server_key=key,
                client_cert=cert,
                client_key=key,
            )
        )

    def client_context(self, name: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca / "ca.pem")
        if name is not None:
            cert, key = self.certs[name]
            context.load_cert_chain(cert, key)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    pki_tools.init_ca(root / "ca")
    pki_tools.init_ca(root / "other", common_name="someone else's CA")
    sans = ["127.0.0.1"]
    certs = {
        name: pki_tools.issue_cert(root / "ca", node_id=name, sans=sans, out_dir=root / "certs")
        for name in ("node_001", "node_002", "outsider")
    }
    certs["foreign"] = pki_tools.issue_cert(
        root / "other", node_id="node_002", sans=sans, out_dir=root / "foreign"
    )
    shutil.rmtree(root / "other")
    return Pki(root / "ca", certs)


async def tls_from(
    source: str, port: int, context: ssl.SSLContext
) -> tuple[trio.SocketStream, TlsStream]:
    tcp = await tcp_from(source, port)
    stream = TlsStream(tcp, context, server_side=False, server_hostname="127.0.0.1")
    try:
        with trio.fail_after(5):
            await stream.do_handshake()
    except trio.BrokenResourceError:
        pass  # refused: the next answer() says so
    return tcp, stream


async def test_the_verified_cn_is_on_the_request(pki: Pki) -> None:
    async with serving(pki.server_context()) as served:
        tcp, stream = await tls_from("127.0.0.2", served.port, pki.client_context("outsider"))
        async with tcp:
            received = await answer(stream)
    assert received.endswith(b'{"client":"127.0.0.2","peer_name":"outsider"}')


async def test_an_outsiders_certificate_from_a_validators_address_counts_as_an_outsider(
    pki: Pki,
) -> None:
    """Before the handshake 127.0.0.1 is a validator; the certificate says otherwise,
    so the third such connection is past the outsiders' per-address bound. A
    validator's certificate from an outsider's address counts as a validator."""
    async with serving(pki.server_context()) as served, contextlib.AsyncExitStack() as streams:
        results = []
        for _ in range(3):
            tcp, stream = await tls_from(VALIDATOR, served.port, pki.client_context("outsider"))
            await streams.enter_async_context(tcp)
            results.append(bool(await answer(stream)))
        assert results == [True, True, False]
        assert served.dropped == ["address_limit"]
        for _ in range(3):
            tcp, stream = await tls_from("127.0.0.9", served.port, pki.client_context("node_002"))
            await streams.enter_async_context(tcp)
            assert await answer(stream)
        counts = served.server.statistics()
        assert (counts.trusted, counts.others) == (3, 2)


async def test_outsiders_pending_handshakes_are_bounded_and_time_out(
    pki: Pki, autojump_clock: trio.testing.MockClock
) -> None:
    """Two outsiders that open and say nothing hold the two handshake slots: a third
    is refused, a validator is not; both slow ones are cut at handshake_timeout."""
    async with serving(pki.server_context()) as served, contextlib.AsyncExitStack() as streams:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            stream = await refusable_tcp_from(source, served.port)
            if stream is not None:
                await streams.enter_async_context(stream)
        await trio.sleep(0.1)
        assert served.dropped == ["handshake_limit"]
        assert served.server.statistics().handshakes == 2
        tcp, tls = await tls_from(VALIDATOR, served.port, pki.client_context("node_002"))
        await streams.enter_async_context(tcp)
        assert await answer(tls)
        await trio.sleep(LIMITS.handshake_timeout)
        assert served.tls_failures == ["timeout", "timeout"]
        assert served.server.statistics().handshakes == 0


@pytest.mark.parametrize(
    ("client", "reason"),
    [(None, "no_certificate"), ("foreign", "unknown_ca"), ("plaintext", "protocol")],
)
async def test_a_refused_handshake_is_counted_with_its_reason(
    pki: Pki, client: str | None, reason: str
) -> None:
    async with serving(pki.server_context()) as served:
        if client == "plaintext":
            async with await tcp_from("127.0.0.2", served.port) as tcp:
                assert not (await answer(tcp)).startswith(b"HTTP/1.1")
        else:
            tcp, stream = await tls_from("127.0.0.2", served.port, pki.client_context(client))
            async with tcp:
                assert await answer(stream) == b""
        await wait_until(lambda: served.server.statistics() == Counts(0, 0, 0))
        assert served.tls_failures == [reason]


async def wait_until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - the server counts in its own task
            await trio.sleep(0.01)


# --- outsiders' turns and Retry-After -----------------------------------------------------


async def test_outsiders_requests_take_turns_validators_do_not_wait() -> None:
    """With one outsider turn, a second outsider's request waits for the first to be
    answered; a validator's is answered while both outsiders are held."""
    release = trio.Event()
    entered: list[str] = []

    async def slow_for_outsiders(request: Request) -> Response:
        entered.append(request.client)
        if request.client != VALIDATOR:
            await release.wait()
        return json_response(200, {})

    one_turn = attrs.evolve(LIMITS, max_outsider_requests=1)
    server = HttpServer(slow_for_outsiders, limits=lambda: one_turn, trust=Trusted())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        async with (
            await tcp_from("127.0.0.2", port) as first,
            await tcp_from("127.0.0.3", port) as second,
            await tcp_from(VALIDATOR, port) as validator,
        ):
            await first.send_all(GET)
            await wait_until(lambda: entered == ["127.0.0.2"])
            await second.send_all(GET)
            assert (await answer(validator)).startswith(b"HTTP/1.1 200")
            assert entered == ["127.0.0.2", VALIDATOR]
            release.set()
            assert (await first.receive_some(65536)).startswith(b"HTTP/1.1 200")
            assert (await second.receive_some(65536)).startswith(b"HTTP/1.1 200")
        await server.shutdown()


@pytest.mark.parametrize(("source", "expected"), [("127.0.0.2", [0, 2, 4]), (VALIDATOR, [0] * 100)])
async def test_an_outsider_told_retry_after_is_not_read_before_it(
    autojump_clock: trio.testing.MockClock, source: str, expected: list[int]
) -> None:
    """An outsider's pipelined requests past a 429 wait out its Retry-After on that
    connection: one answer per Retry-After, not thousands. A validator's connection
    carries other work and is never held off."""
    answered_at: list[float] = []

    async def limited(request: Request) -> Response:
        answered_at.append(trio.current_time())
        return json_response(429, {}, (("retry-after", "2"),))

    server = HttpServer(limited, limits=lambda: LIMITS, trust=Trusted())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        async with await tcp_from(source, port) as stream:
            started = trio.current_time()
            await stream.send_all(GET * 100)
            with trio.move_on_after(5):
                while True:  # read on, so nothing but the hold-off can slow the server
                    await stream.receive_some(65536)
        await server.shutdown()
    before_shutdown = [round(t - started) for t in answered_at if t - started < 5]
    assert before_shutdown == expected
