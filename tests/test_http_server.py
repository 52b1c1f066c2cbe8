"""The lean HTTP server over real loopback sockets, its clocks on the autojump clock: a
request head or body that stalls, an idle keep-alive connection (whatever bytes that
start no request it sends) and a client that does not read are closed at their own
deadline; framing (pipelining, Expect, repeated headers, llhttp's refusals); no error
ends the server, and accept errors from exhaustion pause accepting."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing

import anna_trio.transport.server as server_module
from anna_trio.models import Limits
from anna_trio.transport.server import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    RECEIVE_SIZE,
    HttpServer,
    Request,
    Response,
    json_response,
)

LIMITS = Limits()
KEEP_ALIVE_TIMEOUT = LIMITS.keep_alive_timeout


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async def echo(request: Request) -> Response:
        return json_response(200, {"length": len(request.body)})

    server = HttpServer(echo, limits=lambda: LIMITS)
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

    small = attrs.evolve(LIMITS, max_body_bytes=100)
    server = HttpServer(echo, limits=lambda: small)
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


async def test_head_keeps_its_status_and_headers_and_drops_its_body(small_port: int) -> None:
    """HEAD answers with the headers its handler's answer has, Content-Length included
    (RFC 9110 §9.3.2), and no body: a GET pipelined after it is read as the next answer."""
    _, got = await closed_after(
        small_port, b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    )
    _, received = await closed_after(
        small_port,
        b"HEAD /x HTTP/1.1\r\nhost: t\r\n\r\n"
        b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    head_answer, _, rest = received.partition(b"\r\n\r\n")
    echoed = json.dumps({"method": "HEAD", "path": "/x", "length": 0}, separators=(",", ":"))
    assert head_answer.startswith(b"HTTP/1.1 200 ")
    assert f"content-length: {len(echoed)}".encode() in head_answer.lower().split(b"\r\n")
    assert rest == got


# --- no request ends the server ----------------------------------------------------------


@pytest.fixture
async def counted_port() -> AsyncIterator[tuple[int, list[str]]]:
    """A server whose handler fails on /bug; yields its port and the errors it counted."""
    counted: list[str] = []

    async def handler(request: Request) -> Response:
        if request.path == "/bug":
            raise RuntimeError("a bug of ours")
        return json_response(200, {"path": request.path})

    server = HttpServer(handler, limits=lambda: LIMITS, count_error=counted.append)
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
    real_encode = server_module._encode

    def encode(response: Response, keep_alive: bool, *, body: bool = True) -> bytes:
        if b"/boom" in response.body:
            raise RuntimeError("cannot encode")
        return real_encode(response, keep_alive, body=body)

    monkeypatch.setattr(server_module, "_encode", encode)
    port, counted = counted_port
    _, received = await closed_after(port, b"GET /boom HTTP/1.1\r\nhost: t\r\n\r\n")
    assert received == b""
    _, after = await closed_after(port, b"GET /ok HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
    assert statuses(after) == [200]
    assert counted == ["internal"]  # counted once the failed connection's task is done
    assert "Traceback" in caplog.text and "cannot encode" in caplog.text


# --- the idle deadline, the send deadline, pipelining ------------------------------------


async def test_bytes_that_start_no_request_do_not_extend_the_idle_deadline(
    port: int, autojump_clock: trio.testing.MockClock
) -> None:
    """A `\\r\\n` every few seconds used to hold a connection forever: each reset the
    deadline. The idle deadline runs from the end of the last answer, whatever comes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(HEAD + b"0123456789")
    answered = trio.current_time()
    received, closed = b"", False
    async with stream:
        with trio.move_on_after(10 * KEEP_ALIVE_TIMEOUT):
            while not closed:
                with trio.move_on_after(KEEP_ALIVE_TIMEOUT / 5):
                    try:
                        while chunk := await stream.receive_some(65536):
                            received += chunk
                    except trio.BrokenResourceError:  # a poke that crossed the close: a reset
                        pass
                    closed = True
                if not closed:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(b"\r\n")
    assert closed and statuses(received) == [200]
    assert trio.current_time() - answered < KEEP_ALIVE_TIMEOUT + 1


@pytest.fixture
async def dropping_port() -> AsyncIterator[tuple[int, list[str]]]:
    """A server answering 1 MiB to every request; yields its port and what it dropped."""
    dropped: list[str] = []

    async def big(request: Request) -> Response:
        return Response(200, b"x" * (1 << 20))

    server = HttpServer(big, limits=lambda: LIMITS, count_dropped=dropped.append)
    async with trio.open_nursery() as nursery:
        yield await nursery.start(server.serve, "127.0.0.1", 0), dropped
        await server.shutdown()


async def test_a_client_that_does_not_read_is_dropped_at_the_send_deadline(
    dropping_port: tuple[int, list[str]], autojump_clock: trio.testing.MockClock
) -> None:
    """Pipelined requests whose answers are never read: once the socket buffers are
    full, the server waits send_timeout for the client, then closes the connection."""
    port, dropped = dropping_port
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    started = trio.current_time()
    await stream.send_all(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n" * 64)
    while not dropped:  # noqa: ASYNC110 - the server's clock runs on the autojump clock
        await trio.sleep(1)
    assert dropped == ["send_timeout"]
    assert LIMITS.send_timeout <= trio.current_time() - started < LIMITS.send_timeout + 2
    with pytest.raises(trio.BrokenResourceError):
        with trio.fail_after(5):
            while await stream.receive_some(1 << 20):
                pass
            raise trio.BrokenResourceError  # an orderly close after the partial answer
    await stream.aclose()


def test_pipelined_requests_become_requests_one_slice_at_a_time() -> None:
    """A read full of tiny pipelined requests is parsed FEED_SIZE bytes at a time, up
    to the next complete request: the rest waits as raw bytes, not Request objects."""
    one = b"GET /p HTTP/1.1\r\nhost: t\r\n\r\n"
    parser = server_module._RequestParser("127.0.0.1", None, 100, lambda: 0.0)
    parser.feed(one * (RECEIVE_SIZE // len(one)))
    assert 1 <= len(parser.ready) <= server_module.FEED_SIZE // len(one) + 1
    answered = 0
    while parser.ready:
        parser.ready.popleft()
        answered += 1
        parser.advance()
        assert len(parser.ready) <= server_module.FEED_SIZE // len(one) + 1
    assert answered == RECEIVE_SIZE // len(one)


async def test_thousands_of_pipelined_requests_are_all_answered_in_order(port: int) -> None:
    sent = b"".join(
        b"POST /%d HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%s" % (i, i % 7, b"z" * (i % 7))
        for i in range(3000)
    )
    _, received = await closed_after(
        port, sent + b"GET /last HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    )
    assert statuses(received) == [200] * 3001
    lengths = re.findall(rb'\{"length":(\d+)\}', received)
    assert [int(n) for n in lengths] == [i % 7 for i in range(3000)] + [0]


# --- Expect: 100-continue and repeated headers -------------------------------------------


async def test_expect_100_continue_is_answered_before_the_body_is_read(small_port: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", small_port)
    with trio.fail_after(5):
        await stream.send_all(
            b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-Continue\r\n\r\n"
        )
        interim = await stream.receive_some(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(b"body")
        answer = await stream.receive_some(65536)
    assert statuses(answer) == [200]
    assert answer.endswith(b'"length":4}')
    await stream.aclose()


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        pytest.param(
            b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\nexpect: 100-continue\r\n\r\n",
            [413],
            id="too-large-refused-unread",
        ),
        pytest.param(
            b"POST /x HTTP/1.0\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\nbody",
            [200],
            id="http-1.0-expectation-ignored",
        ),
        pytest.param(
            b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nexpect: 100-continue\r\n"
            b"connection: close\r\n\r\nbody",
            [200],
            id="body-sent-anyway",
        ),
    ],
)
async def test_expect_100_continue_gets_no_interim_answer_when_none_is_due(
    small_port: int, head: bytes, expected: list[int], autojump_clock: trio.testing.MockClock
) -> None:
    _, received = await closed_after(small_port, head)
    assert statuses(received) == expected
    assert b"100 Continue" not in received


@pytest.mark.parametrize("name", [b"Host", b"Content-Length", b"Idempotency-Key"])
async def test_a_repeated_single_header_is_a_400(small_port: int, name: bytes) -> None:
    """Two values where the server can act on one only: which one would be a guess."""
    value = b"4" if name == b"Content-Length" else b"k"
    sent = (
        b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\nidempotency-key: k\r\n"
        + name
        + b": "
        + value
        + b"\r\n\r\nbody"
    )
    _, received = await closed_after(small_port, sent)
    assert statuses(received) == [400]


async def test_other_repeated_headers_are_joined_in_order() -> None:
    seen: list[dict[str, str]] = []

    async def handler(request: Request) -> Response:
        seen.append(request.headers)
        return json_response(200, {})

    server = HttpServer(handler, limits=lambda: LIMITS)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        sent = b"GET /x HTTP/1.1\r\nhost: t\r\nx-a: 1\r\nX-A: 2 \r\nconnection: close\r\n\r\n"
        _, received = await closed_after(port, sent)
        await server.shutdown()
    assert statuses(received) == [200]
    assert seen[0]["x-a"] == "1, 2"


# --- accept errors -----------------------------------------------------------------------


class FailingListener:
    """A listener whose accept fails with `errors` in turn, then reports itself closed."""

    def __init__(self, *errors: OSError) -> None:
        self.errors = list(errors)

    async def accept(self) -> trio.SocketStream:
        await trio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        raise trio.ClosedResourceError


async def test_running_out_of_descriptors_pauses_accepting(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """EMFILE, ENFILE, ENOMEM, ENOBUFS: log, wait ACCEPT_BACKOFF, try again (trio's
    serve_listeners); a busy loop would starve every connection already open."""
    server = HttpServer(echo_nothing, limits=lambda: LIMITS)
    listener = FailingListener(*(OSError(code, os.strerror(code)) for code in CAPACITY_ERRORS))
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        await server._accept(listener, nursery)  # type: ignore[arg-type]
    assert trio.current_time() - started == pytest.approx(
        len(CAPACITY_ERRORS) * server_module.ACCEPT_BACKOFF
    )
    assert caplog.text.count("accept failed") == len(CAPACITY_ERRORS)


async def test_any_other_accept_error_is_raised() -> None:
    server = HttpServer(echo_nothing, limits=lambda: LIMITS)
    failing = FailingListener(OSError(errno.EBADF, "Bad file descriptor"))
    async with trio.open_nursery() as nursery:
        with pytest.raises(OSError, match="Bad file"):
            await server._accept(failing, nursery)  # type: ignore[arg-type]


CAPACITY_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS)


async def echo_nothing(request: Request) -> Response:
    return json_response(200, {})


async def test_a_closing_answer_ends_in_an_orderly_close_not_a_reset(port: int) -> None:
    """After a last answer (here Connection: close, with more bytes behind it) the
    server lingers: it ends its side and drops what still comes, so the client reads
    the answer and an EOF. Closing at once with unread bytes resets the connection,
    and a client's stack may throw away an answer it has not read yet on a reset."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    request = b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    await stream.send_all(request + b"x" * 100_000)
    await trio.sleep(0.5)  # the server has answered (and would have closed) by now
    received = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):  # a reset raises here
            received += chunk
    await stream.aclose()
    assert statuses(received) == [200]
