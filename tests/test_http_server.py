"""The lean HTTP server's clocks, on the autojump clock over real loopback sockets: a
request head or body that stalls, and an idle keep-alive connection, are closed at
their own timeout, and a request that arrives whole is answered without waiting."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from anna_trio.rpc.http import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    KEEP_ALIVE_TIMEOUT,
    HttpServer,
    Request,
    Response,
    json_response,
)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


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
