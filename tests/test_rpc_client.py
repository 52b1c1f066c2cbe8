"""The node-to-node HTTP client against real servers: hypercorn and scripted raw ones."""

from __future__ import annotations

import contextlib
import datetime
import functools
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import hypercorn.trio
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypercorn.config import Config
from hypothesis import given, settings
from hypothesis import strategies as st
from quart import request
from quart_trio import QuartTrio

from anna_trio import pki as pki_tools
from anna_trio._exceptions import PeerError
from anna_trio.transport.client import (
    HttpClient,
    PeerConnectionError,
    PeerTLSError,
    Response,
)

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


# --- throwaway PKI -------------------------------------------------------------------


@attrs.frozen
class Issued:
    cert_path: Path
    key_path: Path

    @property
    def pem(self) -> str:
        return self.cert_path.read_text()


def issue(ca_dir: Path, node_id: str, **options: Any) -> Issued:
    """A leaf from the project's own issuer (anna_trio.tls), SAN 127.0.0.1 unless given."""
    options.setdefault("sans", ["127.0.0.1"])
    cert, key = pki_tools.issue_cert(
        ca_dir, node_id=node_id, out_dir=ca_dir.parent / "leaves", **options
    )
    return Issued(cert, key)


@attrs.frozen
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    stranger: Issued  # signed by a CA the client does not trust
    expired: Issued
    elsewhere: Issued  # valid, but for another host name only

    def client_context(self, *, with_certificate: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.ca.pem)
        if with_certificate:
            context.load_cert_chain(self.client.cert_path, self.client.key_path)
        return context

    def server_context(self, leaf: Issued, *, require_client_cert: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=self.ca.pem)
        context.load_cert_chain(leaf.cert_path, leaf.key_path)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        return context


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_dir, other_dir = directory / "ca", directory / "other" / "ca"
    pki_tools.init_ca(ca_dir)
    pki_tools.init_ca(other_dir)
    now = datetime.datetime.now(datetime.UTC)
    return Pki(
        ca=Issued(ca_dir / "ca.pem", ca_dir / "ca.key"),
        server=issue(ca_dir, "node-1"),
        client=issue(ca_dir, "node-2"),
        stranger=issue(other_dir, "node-x"),
        expired=issue(
            ca_dir,
            "node-old",
            not_before=now - datetime.timedelta(days=10),
            not_after=now - datetime.timedelta(days=1),
        ),
        elsewhere=issue(ca_dir, "node-far", sans=["elsewhere.test"]),
    )


# --- servers -----------------------------------------------------------------------


class ConnectionCountingApp:
    """ASGI middleware recording the client port of each request: one port, one TCP connection."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.client_ports: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.client_ports.append(scope["client"][1])
        await self.app(scope, receive, send)

    @property
    def connections(self) -> int:
        return len(set(self.client_ports))


def make_app() -> ConnectionCountingApp:
    app = QuartTrio(__name__)

    @app.post("/echo")
    async def echo() -> dict[str, Any]:
        return {"got": await request.get_json(), "content_type": request.content_type}

    @app.get("/big")
    async def big() -> str:
        return "x" * 2000

    return ConnectionCountingApp(app)


@contextlib.asynccontextmanager
async def hypercorn_server(app: Any, **settings: Any) -> AsyncIterator[int]:
    """Serve `app` on 127.0.0.1 with hypercorn's trio worker; yield the bound port."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    for name, value in settings.items():
        setattr(config, name, value)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(hypercorn.trio.serve, app, config))
        yield int(binds[0].rsplit(":", 1)[1])
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def raw_server(
    handler: Handler, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    """A scripted TCP (or TLS) server running `handler` per connection; yield its port."""

    async def guarded(stream: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await handler(stream)

    async with trio.open_nursery() as nursery:
        if ssl_context is None:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, guarded, 0, host="127.0.0.1")
            )
            sock = listeners[0].socket
        else:
            listeners = await nursery.start(
                functools.partial(
                    trio.serve_ssl_over_tcp,
                    guarded,
                    0,
                    ssl_context,
                    host="127.0.0.1",
                    https_compatible=True,
                )
            )
            sock = listeners[0].transport_listener.socket
        yield sock.getsockname()[1]
        nursery.cancel_scope.cancel()


class RequestReader:
    """Reads whole requests (head and Content-Length body) off a raw server stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next_request(self) -> bytes | None:
        while b"\r\n\r\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buffer += data
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        match = re.search(rb"(?im)^content-length: *(\d+)", head)
        length = int(match.group(1)) if match else 0
        while len(rest) < length:
            rest += await self.stream.receive_some(65536)
        self.buffer = rest[length:]
        return head + b"\r\n\r\n" + rest[:length]


def ok_response(body: bytes = b'{"ok":true}', *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    head += b"".join(line + b"\r\n" for line in extra)
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


class Script:
    """Per-connection behaviours for a raw server; the n-th connection runs the n-th step."""

    def __init__(self, *steps: Handler) -> None:
        self.steps = list(steps)
        self.accepted = 0

    async def __call__(self, stream: trio.abc.Stream) -> None:
        step = self.steps[min(self.accepted, len(self.steps) - 1)]
        self.accepted += 1
        await step(stream)


async def answer_forever(stream: trio.abc.Stream) -> None:
    reader = RequestReader(stream)
    while await reader.next_request() is not None:
        await stream.send_all(ok_response())


def answer_once(raw: bytes) -> Handler:
    """A connection step: read one request, send `raw`, keep the connection open."""

    async def step(stream: trio.abc.Stream) -> None:
        await RequestReader(stream).next_request()
        await stream.send_all(raw)
        await trio.sleep_forever()

    return step


# --- plain HTTP against hypercorn --------------------------------------------------


async def test_keep_alive_reuses_one_connection_for_many_requests() -> None:
    """Many requests to hypercorn travel over a single TCP connection."""
    app = make_app()
    async with hypercorn_server(app) as port:
        client = HttpClient("127.0.0.1", port)
        for number in range(20):
            response = await client.request("POST", "/echo", json_body={"n": number})
            assert response.status == 200
            assert response.json() == {"got": {"n": number}, "content_type": "application/json"}
        assert client.connected
        await client.aclose()
        assert not client.connected
    assert app.connections == 1


async def test_response_headers_are_lower_cased() -> None:
    """Header names in the Response are lower-case strings."""
    async with hypercorn_server(make_app()) as port:
        client = HttpClient("127.0.0.1", port)
        response = await client.request("GET", "/big", headers={"X-Trace": "abc"})
        await client.aclose()
    assert response.headers["content-type"].startswith("text/html")
    assert all(name == name.lower() for name in response.headers)
    assert response.body == b"x" * 2000


async def test_connection_close_from_server_opens_a_fresh_connection() -> None:
    """A response with `Connection: close` ends the connection; the next request reconnects."""
    app = make_app()
    async with hypercorn_server(app, keep_alive_max_requests=3) as port:
        client = HttpClient("127.0.0.1", port)
        for number in range(7):
            response = await client.request("POST", "/echo", json_body=number)
            assert response.json()["got"] == number
            assert client.connected == (number % 3 != 2)
        await client.aclose()
    assert app.connections == 3


async def test_response_over_the_limit_is_refused() -> None:
    """A Content-Length over max_response_bytes is a PeerConnectionError and drops the connection."""
    async with hypercorn_server(make_app()) as port:
        client = HttpClient("127.0.0.1", port, max_response_bytes=1000)
        with pytest.raises(PeerConnectionError, match="exceeds 1000 bytes") as caught:
            await client.request("GET", "/big")
        assert caught.value.__cause__ is None
        assert not client.connected


# --- scripted servers: edge cases ---------------------------------------------------


async def test_idle_connection_closed_by_server_is_reopened_transparently() -> None:
    """The server closing a kept-alive connection between requests costs one silent retry."""
    closed = trio.Event()

    async def answer_once_then_close(stream: trio.abc.Stream) -> None:
        await RequestReader(stream).next_request()
        await stream.send_all(ok_response())
        await stream.aclose()
        closed.set()

    script = Script(answer_once_then_close, answer_forever)
    async with raw_server(script) as port:
        client = HttpClient("127.0.0.1", port)
        assert (await client.request("GET", "/a")).json() == {"ok": True}
        await closed.wait()
        assert (await client.request("POST", "/b", json_body=[1])).json() == {"ok": True}
        await client.aclose()
    assert script.accepted == 2


async def test_reset_of_a_kept_alive_connection_is_retried_once() -> None:
    """A reset (not a clean close) of a reused connection before any answer is retried too."""

    async def answer_once_then_reset(stream: trio.abc.Stream) -> None:
        assert isinstance(stream, trio.SocketStream)
        await RequestReader(stream).next_request()
        await stream.send_all(ok_response())
        await trio.lowlevel.wait_readable(stream.socket)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    script = Script(answer_once_then_reset, answer_forever)
    async with raw_server(script) as port:
        client = HttpClient("127.0.0.1", port)
        await client.request("GET", "/a")
        assert (await client.request("GET", "/b")).status == 200
        await client.aclose()
    assert script.accepted == 2


async def test_fresh_connection_closed_before_answer_is_not_retried() -> None:
    """On a new connection, EOF before the response is an error, not a retry."""

    async def read_then_close(stream: trio.abc.Stream) -> None:
        await RequestReader(stream).next_request()
        await stream.aclose()

    script = Script(read_then_close, answer_forever)
    async with raw_server(script) as port:
        client = HttpClient("127.0.0.1", port)
        with pytest.raises(PeerConnectionError, match="closed the connection before answering"):
            await client.request("POST", "/rpc/submit", json_body={})
        assert not client.connected
    assert script.accepted == 1


async def test_reused_connection_closed_mid_response_is_not_retried() -> None:
    """Once response bytes arrived, a dropped connection is an error: the request was seen."""

    async def answer_then_half_answer(stream: trio.abc.Stream) -> None:
        reader = RequestReader(stream)
        await reader.next_request()
        await stream.send_all(ok_response())
        await reader.next_request()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{")
        await stream.aclose()

    script = Script(answer_then_half_answer, answer_forever)
    async with raw_server(script) as port:
        client = HttpClient("127.0.0.1", port)
        await client.request("GET", "/a")
        with pytest.raises(PeerConnectionError):
            await client.request("GET", "/b")
    assert script.accepted == 1


async def test_garbage_from_peer_is_a_connection_error() -> None:
    """Bytes that are not HTTP/1.1 give PeerConnectionError, chained to the parser error."""

    garbage = answer_once(b"\x00\x01\x02 not http at all\r\n\r\n")
    async with raw_server(Script(garbage)) as port:
        client = HttpClient("127.0.0.1", port)
        with pytest.raises(PeerConnectionError) as caught:
            await client.request("GET", "/health")
        assert caught.value.__cause__ is not None
        assert not client.connected


async def test_chunked_response_over_the_limit_is_refused() -> None:
    """A chunked body growing past max_response_bytes is refused while streaming."""

    chunk = b"258\r\n" + b"y" * 600 + b"\r\n"
    chunks = answer_once(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk * 3)
    async with raw_server(Script(chunks)) as port:
        client = HttpClient("127.0.0.1", port, max_response_bytes=1000)
        with pytest.raises(PeerConnectionError, match="exceeds"):
            await client.request("GET", "/big")


async def test_connection_refused_is_a_connection_error() -> None:
    """Nobody listening on the port gives PeerConnectionError (a PeerError)."""
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = HttpClient("127.0.0.1", port)
    with pytest.raises(PeerConnectionError) as caught:
        await client.request("GET", "/health")
    assert isinstance(caught.value, PeerError)
    assert isinstance(caught.value.__cause__, OSError)


async def test_cancellation_mid_request_closes_and_next_request_reconnects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request cancelled while waiting closes the connection; the next one uses a fresh one."""

    async def never_answer(stream: trio.abc.Stream) -> None:
        await RequestReader(stream).next_request()
        await trio.sleep_forever()

    script = Script(never_answer, answer_forever)
    async with raw_server(script) as port:
        client = HttpClient("127.0.0.1", port)
        with trio.move_on_after(5) as scope:
            await client.request("POST", "/rpc/submit", json_body={"x": 1})
        assert scope.cancelled_caught
        assert not client.connected
        assert (await client.request("GET", "/health")).json() == {"ok": True}
        await client.aclose()
    assert script.accepted == 2


@settings(max_examples=25, deadline=None)
@given(body=st.binary(max_size=5000), chunked=st.booleans())
async def test_body_arrives_intact_whatever_the_framing(body: bytes, chunked: bool) -> None:
    """Any body, framed by Content-Length or chunks, reaches the caller byte for byte."""

    async def answer(stream: trio.abc.Stream) -> None:
        await RequestReader(stream).next_request()
        if chunked:
            chunks = b"".join(
                b"%x\r\n%s\r\n" % (len(part), part)
                for part in (body[i : i + 700] for i in range(0, len(body), 700))
            )
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
            )
        else:
            await stream.send_all(ok_response(body))
        await trio.sleep_forever()

    async with raw_server(Script(answer)) as port:
        client = HttpClient("127.0.0.1", port)
        response = await client.request("GET", "/bytes")
        await client.aclose()
    assert response.body == body


def test_invalid_json_body_is_a_peer_error() -> None:
    """Response.json on junk raises PeerError('invalid JSON from peer')."""
    for junk in (b"<html>", b"\xff\xfe", b""):
        with pytest.raises(PeerError, match="invalid JSON from peer"):
            Response(status=200, headers={}, body=junk).json()


# --- TLS ---------------------------------------------------------------------------


async def test_mutual_tls_against_hypercorn_keeps_one_connection(pki: Pki) -> None:
    """With client and server certificates from the cluster CA, requests share one TLS connection."""
    app = make_app()
    server_settings = {
        "certfile": str(pki.server.cert_path),
        "keyfile": str(pki.server.key_path),
        "ca_certs": str(pki.ca.cert_path),
        "verify_mode": ssl.CERT_REQUIRED,
    }
    seen: list[str] = []

    def expect_node_1(ssl_object: ssl.SSLObject) -> str | None:
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        seen.append(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)  # type: ignore[arg-type]
        return None

    async with hypercorn_server(app, **server_settings) as port:
        client = HttpClient(
            "127.0.0.1", port, ssl_context=pki.client_context(), verify_peer=expect_node_1
        )
        for number in range(5):
            assert (await client.request("POST", "/echo", json_body=number)).json()["got"] == number
        await client.aclose()
    assert app.connections == 1
    assert seen == ["node-1"]


@pytest.mark.parametrize(
    ("leaf", "reason"),
    [
        ("stranger", "unknown_ca"),
        ("expired", "certificate_expired"),
        ("elsewhere", "hostname_mismatch"),
    ],
)
async def test_bad_server_certificate_is_a_tls_error_with_reason(
    pki: Pki, leaf: str, reason: str
) -> None:
    """A server certificate the client cannot accept gives PeerTLSError(reason) and reports it."""
    failures: list[str] = []
    server_context = pki.server_context(getattr(pki, leaf))
    async with raw_server(answer_forever, ssl_context=server_context) as port:
        client = HttpClient(
            "127.0.0.1", port, ssl_context=pki.client_context(), on_tls_failure=failures.append
        )
        with pytest.raises(PeerTLSError) as caught:
            await client.request("GET", "/health")
    assert caught.value.reason == reason
    assert isinstance(caught.value.__cause__, trio.BrokenResourceError)
    assert failures == [reason]
    assert not client.connected


async def test_verify_peer_refusal_is_a_tls_error(pki: Pki) -> None:
    """verify_peer returning a reason refuses the peer after the handshake, before any request."""
    failures: list[str] = []
    requests_seen: list[bytes | None] = []

    async def record(stream: trio.abc.Stream) -> None:
        requests_seen.append(await RequestReader(stream).next_request())

    async with raw_server(record, ssl_context=pki.server_context(pki.server)) as port:
        client = HttpClient(
            "127.0.0.1",
            port,
            ssl_context=pki.client_context(),
            verify_peer=lambda ssl_object: "cn_mismatch: got node-1, expected node-9",
            on_tls_failure=failures.append,
        )
        with pytest.raises(PeerTLSError) as caught:
            await client.request("GET", "/health")
    assert caught.value.reason == "cn_mismatch: got node-1, expected node-9"
    assert failures == ["cn_mismatch"]  # the metric label: the kind, not the detail
    assert requests_seen in ([], [None])


async def test_tls_client_against_plain_server_is_a_protocol_tls_error() -> None:
    """Speaking TLS to a plain-HTTP port fails the handshake with reason 'protocol'."""

    async def answer_plain(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await trio.sleep_forever()

    async with raw_server(Script(answer_plain)) as port:
        client = HttpClient("127.0.0.1", port, ssl_context=ssl.create_default_context())
        with pytest.raises(PeerTLSError) as caught:
            await client.request("GET", "/health")
    assert caught.value.reason == "protocol"


async def test_server_refusing_our_certificate_is_a_tls_error(pki: Pki) -> None:
    """Hypercorn refusing our (missing) client certificate makes the request a PeerTLSError."""
    failures: list[str] = []
    server_settings = {
        "certfile": str(pki.server.cert_path),
        "keyfile": str(pki.server.key_path),
        "ca_certs": str(pki.ca.cert_path),
        "verify_mode": ssl.CERT_REQUIRED,
    }
    async with hypercorn_server(make_app(), **server_settings) as port:
        client = HttpClient(
            "127.0.0.1",
            port,
            ssl_context=pki.client_context(with_certificate=False),
            on_tls_failure=failures.append,
        )
        with pytest.raises(PeerTLSError) as caught:
            await client.request("GET", "/health")
    assert caught.value.reason == "closed_after_handshake"
    assert failures == ["closed_after_handshake"]


# --- framing, on llhttp --------------------------------------------------------------------


async def test_an_answer_to_head_ends_with_its_head() -> None:
    """A HEAD answer announces a length but carries no body: the client does not wait."""

    async def answer_head(stream: trio.abc.Stream) -> None:
        reader = RequestReader(stream)
        while await reader.next_request() is not None:
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n")

    async with raw_server(Script(answer_head)) as port:
        client = HttpClient("127.0.0.1", port)
        with trio.fail_after(5):
            first = await client.request("HEAD", "/health")
            second = await client.request("HEAD", "/health")
        await client.aclose()
    assert (first.status, first.body, second.status) == (200, b"", 200)


async def test_a_body_sent_with_an_answer_to_head_is_not_read() -> None:
    with_body = answer_once(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 4\r\n\r\nbody")
    async with raw_server(Script(with_body)) as port:
        client = HttpClient("127.0.0.1", port)
        response = await client.request("HEAD", "/x")
        await client.aclose()
    assert (response.status, response.body) == (400, b"")


async def test_informational_answers_are_skipped() -> None:
    after_100 = answer_once(b"HTTP/1.1 100 Continue\r\n\r\n" + ok_response(b'{"n":1}'))
    async with raw_server(Script(after_100)) as port:
        client = HttpClient("127.0.0.1", port)
        response = await client.request("POST", "/x", body=b"{}")
        await client.aclose()
    assert (response.status, response.body) == (200, b'{"n":1}')


async def test_a_body_framed_by_eof_is_whole_and_the_connection_not_reused() -> None:
    async def answer_then_close(stream: trio.abc.Stream) -> None:
        await RequestReader(stream).next_request()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"z" * 5000)

    script = Script(answer_then_close)
    async with raw_server(script) as port:
        client = HttpClient("127.0.0.1", port)
        response = await client.request("GET", "/x")
        assert response.body == b"z" * 5000
        assert not client.connected
        assert (await client.request("GET", "/x")).body == b"z" * 5000
    assert script.accepted == 2


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GE T", "/x", {}),
        ("GET", "/a b", {}),
        ("GET", "/x\r\nInjected: 1", {}),
        ("GET", "/x", {"bad name": "v"}),
        ("GET", "/x", {"x": "a\r\nInjected: 1"}),
        ("GET", "/x", {"x": "a\x05b"}),
        ("GET", "/x", {"x": " padded"}),
    ],
)
async def test_what_http_does_not_allow_is_refused_before_sending(
    method: str, path: str, headers: dict[str, str]
) -> None:
    script = Script(answer_forever)
    async with raw_server(script) as port:
        client = HttpClient("127.0.0.1", port)
        with pytest.raises(PeerConnectionError, match="cannot send"):
            await client.request(method, path, headers=headers)
        assert not client.connected
    assert script.accepted == 0  # refused before a connection was even opened
