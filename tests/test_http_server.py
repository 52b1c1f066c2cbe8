"""The lean HTTP server's clocks, on the autojump clock over real loopback sockets: a
request head or body that stalls, and an idle keep-alive connection, are closed at
their own timeout, and a request that arrives whole is answered without waiting."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from anna_trio.transport.server import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    KEEP_ALIVE_TIMEOUT,
    HttpServer,
    Request,
    Response,
    json_response,
)


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async def echo(request: Request) -> Response:
        return json_response(200, {"length": len(request.body)})

    server = HttpServer(echo)
    async with trio.open_nursery() as nursery:
        yield await nursery.start(server.serve, "127.0.0.1", 0)
        await server.shutdown()


async def closed_after(port: int, sent: bytes) -> tuple[float, bytes]:
    """Send `sent`, read until the server closes: (seconds it took, what came back)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    started = trio.current_time()
    await stream.send_all(sent)
    received = b""
    with trio.fail_after(10 * KEEP_ALIVE_TIMEOUT):
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return trio.current_time() - started, received


HEAD = b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\n"


async def test_stalled_body_is_cut_off_at_the_body_timeout(
    port: int, autojump_clock: trio.testing.MockClock
) -> None:
    took, received = await closed_after(port, HEAD + b"abc")
    assert received == b""
    assert BODY_TIMEOUT <= took < BODY_TIMEOUT + 1


async def test_stalled_head_is_cut_off_at_the_header_timeout(
    port: int, autojump_clock: trio.testing.MockClock
) -> None:
    took, received = await closed_after(port, b"POST /x HTTP/1.1\r\nhost: t\r\n")
    assert received == b""
    assert HEADER_TIMEOUT <= took < HEADER_TIMEOUT + 1


async def test_whole_request_is_answered_then_idle_connection_closes(
    port: int, autojump_clock: trio.testing.MockClock
) -> None:
    took, received = await closed_after(port, HEAD + b"0123456789")
    assert received.startswith(b"HTTP/1.1 200 ")
    assert received.endswith(b'{"length":10}')
    assert KEEP_ALIVE_TIMEOUT <= took < KEEP_ALIVE_TIMEOUT + 1


# --- framing, on llhttp --------------------------------------------------------------------


@pytest.fixture
async def small_port() -> AsyncIterator[int]:
    """A server with a 100-byte body limit that echoes method, path and body length."""

    async def echo(request: Request) -> Response:
        return json_response(
            200, {"method": request.method, "path": request.path, "length": len(request.body)}
        )

    server = HttpServer(echo, max_body_bytes=lambda: 100)
    async with trio.open_nursery() as nursery:
        yield await nursery.start(server.serve, "127.0.0.1", 0)
        await server.shutdown()


def statuses(received: bytes) -> list[int]:
    """Status codes of every answer in the stream (the bodies here never hold one)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]


async def test_pipelined_requests_are_answered_in_order(small_port: int) -> None:
    sent = (
        b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n"
        b"POST /b HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nxyz"
        b"GET /c HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    )
    _, received = await closed_after(small_port, sent)
    assert statuses(received) == [200, 200, 200]
    assert received.index(b'"/a"') < received.index(b'"/b","length":3') < received.index(b'"/c"')
    assert received.count(b"connection: close") == 1


async def test_body_over_the_limit_is_refused_from_its_length_unread(
    small_port: int, autojump_clock: trio.testing.MockClock
) -> None:
    """413 from the Content-Length alone: the server does not wait for the 10 MB (it
    drains for DRAIN_SECONDS of the mock clock, then closes)."""
    _, received = await closed_after(
        small_port, b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 10000000\r\n\r\n"
    )
    assert statuses(received) == [413]


async def test_chunked_body_over_the_limit_is_refused(
    small_port: int, autojump_clock: trio.testing.MockClock
) -> None:
    chunk = b"40\r\n" + b"y" * 64 + b"\r\n"
    sent = b"POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n" + chunk * 3
    _, received = await closed_after(small_port, sent + b"0\r\n\r\n")
    assert statuses(received) == [413]


async def test_chunked_body_under_the_limit_is_decoded(small_port: int) -> None:
    sent = b"POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    _, received = await closed_after(small_port, sent + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert statuses(received) == [200]
    assert received.endswith(b'"length":5}')


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"GET /x HTTP/1.1\r\n\r\n", id="no-host"),
        pytest.param(b"GET /x HTTP/1.1\r\nhost: t\r\nbad header: v\r\n\r\n", id="bad-name"),
        pytest.param(b"GET /x HTTP/1.1\r\nhost: t\r\nx: a\x05b\r\n\r\n", id="control-in-value"),
        pytest.param(
            b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            id="two-lengths",
        ),
        pytest.param(
            b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n"
            b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            id="length-and-chunked",
        ),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="h2-preface"),
        pytest.param(b"\x00\x01 junk\r\n\r\n", id="junk"),
        pytest.param(b"GET /x HTTP/1.1\nhost: t\n\n", id="bare-lf"),
        pytest.param(b"GET x HTTP/1.1\r\nhost: t\r\n\r\n", id="target-not-a-path"),
    ],
)
async def test_malformed_requests_get_400_and_close(small_port: int, sent: bytes) -> None:
    _, received = await closed_after(small_port, sent)
    assert statuses(received) == [400]
    assert b"malformed HTTP" in received


async def test_a_head_that_never_ends_is_refused_at_the_limit(small_port: int) -> None:
    """A header line growing forever is cut off near MAX_HEADER_BYTES, not buffered."""
    stream = await trio.open_tcp_stream("127.0.0.1", small_port)
    await stream.send_all(b"GET /x HTTP/1.1\r\nhost: t\r\nx-long: ")
    received = b""
    with trio.fail_after(5):
        for _ in range(64):
            try:
                await stream.send_all(b"v" * 1024)
            except trio.BrokenResourceError:
                break
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    assert statuses(received) == [400]
    assert b"head over" in received


async def test_http_1_0_is_answered_and_closed(small_port: int) -> None:
    _, received = await closed_after(small_port, b"GET /x HTTP/1.0\r\n\r\n")
    assert statuses(received) == [200]
    assert b"connection: close" in received


async def test_an_upgrade_request_is_answered_then_closed_without_a_second_answer(
    small_port: int,
) -> None:
    sent = b"GET /x HTTP/1.1\r\nhost: t\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\nmore"
    _, received = await closed_after(small_port, sent)
    assert statuses(received) == [200]


async def test_head_keeps_its_status_and_drops_its_body(small_port: int) -> None:
    _, received = await closed_after(
        small_port, b"HEAD /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    )
    assert statuses(received) == [200]
    assert received.endswith(b"\r\n\r\n")


# --- no request ends the server ----------------------------------------------------------


@pytest.fixture
async def counted_port() -> AsyncIterator[tuple[int, list[str]]]:
    """A server whose handler fails on /bug; yields its port and the errors it counted."""
    counted: list[str] = []

    async def handler(request: Request) -> Response:
        if request.path == "/bug":
            raise RuntimeError("a bug of ours")
        return json_response(200, {"path": request.path})

    server = HttpServer(handler, count_error=counted.append)
    async with trio.open_nursery() as nursery:
        yield await nursery.start(server.serve, "127.0.0.1", 0), counted
        await server.shutdown()


@pytest.mark.parametrize(
    "target",
    [b"//[", b"http://[::1", b"http://[::1/x", b"//[::1", b"/x?//[", b"http://[v7.x]/"],
)
async def test_a_target_urlsplit_refuses_is_a_400_and_the_server_goes_on(
    counted_port: tuple[int, list[str]], target: bytes
) -> None:
    """`GET //[` used to raise inside llhttp's callback and end annad (exit 1)."""
    port, counted = counted_port
    sent = b"GET " + target + b" HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    _, received = await closed_after(port, sent)
    assert statuses(received) in ([400], [200])
    if statuses(received) == [400]:
        assert counted == ["malformed"]
    _, after = await closed_after(port, b"GET /ok HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
    assert statuses(after) == [200]


async def test_a_handler_bug_is_a_counted_500_and_the_connection_goes_on(
    counted_port: tuple[int, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    port, counted = counted_port
    sent = b"GET /bug HTTP/1.1\r\nhost: t\r\n\r\nGET /ok HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    _, received = await closed_after(port, sent)
    assert statuses(received) == [500, 200]
    assert counted == ["internal"]
    assert "a bug of ours" in caplog.text


async def test_an_error_of_ours_outside_the_handler_closes_only_its_connection(
    counted_port: tuple[int, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failure where no handler runs (here: encoding the answer) is logged with its
    traceback, counted, and ends that connection; the next one is served."""
    import anna_trio.transport.server as http_module

    real_encode = http_module._encode

    def encode(response: Response, keep_alive: bool) -> bytes:
        if b"/boom" in response.body:
            raise RuntimeError("cannot encode")
        return real_encode(response, keep_alive)

    monkeypatch.setattr(http_module, "_encode", encode)
    port, counted = counted_port
    _, received = await closed_after(port, b"GET /boom HTTP/1.1\r\nhost: t\r\n\r\n")
    assert received == b""
    _, after = await closed_after(port, b"GET /ok HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
    assert statuses(after) == [200]
    assert counted == ["internal"]  # counted once the failed connection's task is done
    assert "Traceback" in caplog.text and "cannot encode" in caplog.text
