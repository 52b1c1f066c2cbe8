"""The metrics listener on real sockets: the console app on hypercorn behind the capped
front door (issue 17's bounds, issue 16's attacks on this port).

Connections are capped in total (the rest wait in the backlog) and per client address
(refused); a client that stops reading is disconnected; bytes that start no request do
not hold a connection open; the requests that once crashed the daemon are 4xx here;
shutdown finishes in-flight requests within the grace period. Real clock, short bounds.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from quart_trio import QuartTrio

from anna_trio.console import CappedRelay, ConnectionLimits, ConsoleServer, make_app, server
from anna_trio.console.listener import hypercorn_refusal
from anna_trio.metrics import Metrics
from anna_trio.transport.client import HttpClient
from console_fakes import FakeSource

BIG = 4 * 1024 * 1024
READ = 65536


def console_app(tmp_path: Path, errors: list[str] | None = None) -> QuartTrio:
    """The real app (its guard and error handlers) plus three test routes."""
    (tmp_path / "audit.jsonl").write_bytes(b"")
    app = make_app(
        FakeSource(tmp_path / "audit.jsonl"),
        Metrics("node_001"),
        health=lambda: {"status": "ok"},
        is_ready=lambda: True,
        failpoints_http=False,
        console=True,
        count_error=(errors if errors is not None else []).append,
    )

    @app.get("/big")
    async def big() -> bytes:
        return b"x" * BIG

    @app.get("/slow")
    async def slow() -> str:
        await trio.sleep(0.5)
        return "slow done"

    @app.get("/stuck")
    async def stuck() -> str:
        await trio.sleep(60)
        return "never"

    return app


@attrs.define
class Running:
    host: str
    port: int
    server: ConsoleServer
    dropped: list[str]
    finished: trio.Event
    refused: list[str]  # what the relay counted of hypercorn's own refusals
    app_errors: list[str]  # what the app counted

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(self.host, self.port)

    async def get(self, path: str) -> tuple[int, bytes]:
        client = HttpClient(self.host, self.port)
        try:
            with trio.fail_after(5):
                response = await client.request("GET", path)
            return response.status, response.body
        finally:
            await client.aclose()


@asynccontextmanager
async def serving(tmp_path: Path, *, grace: float = 2.0, **limits: Any) -> AsyncIterator[Running]:
    dropped: list[str] = []
    refused: list[str] = []
    app_errors: list[str] = []
    front = CappedRelay(ConnectionLimits(**limits), dropped=dropped.append, refused=refused.append)
    console = ConsoleServer(console_app(tmp_path, app_errors), front, graceful_timeout=grace)
    finished = trio.Event()

    async def serve(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        try:
            await console.serve("127.0.0.1", 0, task_status=task_status)
        finally:
            finished.set()

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve)
        try:
            yield Running(host, port, console, dropped, finished, refused, app_errors)
        finally:
            console.shutdown()


def listening_unix_sockets() -> set[str]:
    """The names this process listens on as AF_UNIX sockets, as /proc/net/unix lists them
    (an abstract name starts with `@`)."""
    ours = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                ours.add(link.removeprefix("socket:[").removesuffix("]"))
    names = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()  # Num RefCount Protocol Flags Type St Inode [Path]
        if len(fields) == 8 and fields[6] in ours and int(fields[3], 16) & 0x10000:
            names.add(fields[7])  # 0x10000: __SO_ACCEPTCON, a listening socket
    return names


def private_socket_directory(name: str) -> Path:
    """The directory of the socket listening on `name`, checked to be a path (not an
    abstract name) in a directory of mode 0700 owned by this user."""
    assert not name.startswith("@"), f"hypercorn listens on the abstract socket {name}"
    socket_path = Path(name)
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    directory = socket_path.parent.stat()
    assert (stat.S_IMODE(directory.st_mode), directory.st_uid) == (0o700, os.getuid())
    return socket_path.parent


async def raw(running: Running, data: bytes, *, wait: float = 2.0) -> bytes:
    """Send bytes on a fresh connection (half-closing after), return what came back."""
    stream = await running.connect()
    received = bytearray()
    with trio.move_on_after(wait):
        try:
            await stream.send_all(data)
            while chunk := await stream.receive_some(READ):
                received += chunk
        except trio.BrokenResourceError:
            pass
    await stream.aclose()
    return bytes(received)


async def closed_within(stream: trio.SocketStream, seconds: float) -> bool:
    """Whether the server closes `stream` within `seconds` (reading what it sends)."""
    with trio.move_on_after(seconds):
        try:
            while await stream.receive_some(READ):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def test_requests_pass_through_and_keep_alive(tmp_path: Path) -> None:
    """Answers come through the relay, several on one kept-alive connection."""
    async with serving(tmp_path) as running:
        client = HttpClient(running.host, running.port)
        try:
            for _ in range(3):
                with trio.fail_after(5):
                    response = await client.request("GET", "/health")
                assert (response.status, response.json()) == (200, {"status": "ok"})
            response = await client.request("GET", "/big")
            assert len(response.body) == BIG
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET //[ HTTP/1.1",
        b"GET http://[::1 HTTP/1.1",
        b"GET http://[::1]:x/rpc/status HTTP/1.1",
        b"GET //[::1]:x/rpc/status HTTP/1.1",
        b"GET /\x00 HTTP/1.1",
        b"GET /\xff\xfe HTTP/1.1",
        b"\xff\xfe\x00 junk",
        b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 20_000,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
    ],
)
async def test_requests_that_crashed_the_old_listener_are_refused(
    tmp_path: Path, request_line: bytes
) -> None:
    """Issue 16's crashing targets and friends: a 4xx or a closed connection, never a
    500, and the listener answers the next request."""
    async with serving(tmp_path) as running:
        answer = await raw(running, request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b" 500 " not in answer.split(b"\r\n", 1)[0], answer[:200]
        if answer.startswith(b"HTTP/1.1 "):
            assert answer[9:10] == b"4", answer[:200]
        assert await running.get("/health") == (200, b'{"status":"ok"}')


@pytest.mark.parametrize(
    ("request_head", "kind"),
    [
        (b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", "malformed"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "malformed"),
        (b"\xff\xfe\x00 junk\r\n\r\n", "malformed"),
        (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 20_000, "too_large"),
    ],
)
async def test_requests_hypercorn_refuses_are_counted_once(
    tmp_path: Path, request_head: bytes, kind: str
) -> None:
    """A request hypercorn's parser refuses never reaches the app: the relay counts it
    (issue 16: every listener counts malformed input), and only it does."""
    async with serving(tmp_path) as running:
        answer = await raw(running, request_head)
        assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
        assert (running.refused, running.app_errors) == ([kind], [])


async def test_the_apps_own_refusals_are_not_counted_again(tmp_path: Path) -> None:
    """A 400 the app counted (an unsplittable target) and a 404 pass the relay uncounted."""
    async with serving(tmp_path) as running:
        assert (await raw(running, b"GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
            b"HTTP/1.1 400"
        )
        assert (await running.get("/no/such/page"))[0] == 404
        assert (running.refused, running.app_errors) == ([], ["malformed"])


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"HTTP/1.1 400 \r\ncontent-length: 0\r\nconnection: close\r\n\r\n", "malformed"),
        (
            b"HTTP/1.1 200 \r\ncontent-length: 2\r\n\r\nokHTTP/1.1 431 \r\nContent-Length: 0\r\n\r\n",
            "too_large",
        ),
        (b'HTTP/1.1 400 \r\ncontent-length: 12\r\n\r\n{"error":1}', None),
        (b"HTTP/1.1 200 \r\ncontent-length: 0\r\n\r\n", None),
        (b"HTTP/1.1 400 \r\ncontent-length: 0\r\n", None),  # head not finished
        (b"", None),
    ],
)
def test_hypercorn_refusal_is_a_4xx_with_no_body(answer: bytes, kind: str | None) -> None:
    assert hypercorn_refusal(answer) == kind


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /health HTTP/1.0\r\n\r\n",
    ],
)
async def test_a_connection_the_client_asked_to_close_is_closed(
    tmp_path: Path, request_head: bytes
) -> None:
    """`Connection: close` (or HTTP/1.0): the answer, then the server's close at once
    (quart-trio's cancellation used to cut hypercorn's close short: open for 10 s)."""
    async with serving(tmp_path) as running:
        stream = await running.connect()
        await stream.send_all(request_head)
        answer = b""
        with trio.fail_after(1):
            while chunk := await stream.receive_some(READ):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}')
        await stream.aclose()


async def test_a_client_over_its_share_is_refused(tmp_path: Path) -> None:
    """The (max_per_client + 1)-th connection from one address is closed at once and
    counted; when one of its connections ends, that address is served again."""
    async with serving(tmp_path, max_per_client=2) as running:
        held = [await running.connect() for _ in range(2)]
        await trio.sleep(0.2)  # both accepted
        extra = await running.connect()
        assert await closed_within(extra, 2)
        await extra.aclose()
        assert running.dropped == ["per_client_cap"]
        await held[0].aclose()
        await trio.sleep(0.2)
        assert (await running.get("/health"))[0] == 200
        for stream in held[1:]:
            await stream.aclose()


async def test_a_connection_per_request_is_not_held_against_its_client(
    tmp_path: Path,
) -> None:
    """A client that opens a fresh connection for each request, faster than closed
    connections drain, is still served: only connections it holds open count
    against its share."""
    async with serving(tmp_path, max_per_client=4) as running:
        with trio.fail_after(10):
            for _ in range(20):
                assert (await running.get("/health"))[0] == 200
        assert running.dropped == []


async def test_connections_over_the_cap_wait_in_the_backlog(tmp_path: Path) -> None:
    """At max_connections nothing more is accepted: a request on a further connection
    is answered only once a slot is free."""
    async with serving(tmp_path, max_connections=2) as running:
        held = [await running.connect() for _ in range(2)]
        await trio.sleep(0.2)
        waiting = await running.connect()
        await waiting.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.move_on_after(1.0):
            assert not await waiting.receive_some(READ), "answered over the cap"
        await held[0].aclose()
        with trio.fail_after(5):
            assert (await waiting.receive_some(READ)).startswith(b"HTTP/1.1 200")
        for stream in [*held[1:], waiting]:
            await stream.aclose()


async def test_a_client_that_stops_reading_is_disconnected(tmp_path: Path) -> None:
    """Pipelined requests for big answers that are never read: after send_timeout the
    connection is dropped (counted), and other clients are served all along."""
    async with serving(tmp_path, send_timeout=0.5) as running:
        greedy = await running.connect()
        await greedy.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 8)
        with trio.fail_after(10):
            while not running.dropped:
                assert (await running.get("/health"))[0] == 200
                await trio.sleep(0.1)
        assert running.dropped == ["send_timeout"]
        await greedy.aclose()


async def test_a_closed_connection_frees_its_slot_at_once(tmp_path: Path) -> None:
    """Connect-and-close over and over with one slot: each close frees it at once
    (hypercorn alone would hold each for its keep-alive timeout)."""
    async with serving(tmp_path, max_connections=1) as running:
        with trio.fail_after(3):
            for _ in range(20):
                stream = await running.connect()
                await stream.aclose()
            assert (await running.get("/health"))[0] == 200


async def test_a_half_closed_client_still_gets_its_answer(tmp_path: Path) -> None:
    """A request followed by the client's close of its side is answered in full, and
    the connection ends within drain_after_close."""
    async with serving(tmp_path) as running:
        stream = await running.connect()
        await stream.send_all(b"GET /slow HTTP/1.0\r\nHost: x\r\n\r\n")
        await stream.send_eof()
        answer = b""
        with trio.fail_after(3):
            while chunk := await stream.receive_some(READ):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"slow done")
        await stream.aclose()


async def test_bytes_that_start_no_request_do_not_hold_a_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CRLF every 0.2 s (issue 16) or a head that never ends: closed after the
    keep-alive timeout all the same."""
    monkeypatch.setattr(server, "KEEP_ALIVE_TIMEOUT", 1.0)
    async with serving(tmp_path) as running:
        for trickle in (b"\r\n", b"X-A: b\r\n"):
            stream = await running.connect()
            if trickle != b"\r\n":
                await stream.send_all(b"GET /health HTTP/1.1\r\n")
            closed = False
            with trio.move_on_after(5):
                try:
                    while True:
                        await stream.send_all(trickle)
                        with trio.move_on_after(0.2):
                            if not await stream.receive_some(READ):
                                closed = True
                                break
                except trio.BrokenResourceError:
                    closed = True
            assert closed, f"still open after 5 s of {trickle!r}"
            await stream.aclose()


async def test_shutdown_finishes_in_flight_requests_and_closes_idle_ones(
    tmp_path: Path,
) -> None:
    """shutdown(): no new connection; a request in flight gets its answer; an idle
    keep-alive connection is closed; serve() returns."""
    async with serving(tmp_path) as running:
        idle = await running.connect()
        await trio.sleep(0.1)
        busy = await running.connect()
        await busy.send_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(0.1)
        running.server.shutdown()
        with trio.fail_after(5):
            answer = b""
            while b"slow done" not in answer:
                answer += await busy.receive_some(READ)
            assert answer.startswith(b"HTTP/1.1 200")
            assert await closed_within(idle, 5)
            await running.finished.wait()
        with pytest.raises(OSError):
            await running.connect()
        await idle.aclose()
        await busy.aclose()


async def test_shutdown_ends_within_the_grace_period(tmp_path: Path) -> None:
    """A request that would outlast the grace period is cut off at it."""
    async with serving(tmp_path, grace=1.0) as running:
        stuck = await running.connect()
        await stuck.send_all(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(0.1)
        begin = trio.current_time()
        running.server.shutdown()
        with trio.fail_after(5):
            await running.finished.wait()
        assert trio.current_time() - begin < 3.0
        await stuck.aclose()


async def test_hypercorn_listens_in_a_private_directory_removed_at_shutdown(
    tmp_path: Path,
) -> None:
    """hypercorn's socket is a path, not an abstract name (which any local process could
    connect to, past the cap), in a directory of mode 0700 that only this user can
    enter; shutdown removes the directory."""
    before = listening_unix_sockets()
    async with serving(tmp_path) as running:
        (name,) = listening_unix_sockets() - before
        directory = private_socket_directory(name)
        assert (await running.get("/health"))[0] == 200
        running.server.shutdown()
        with trio.fail_after(5):
            await running.finished.wait()
        assert not directory.exists()


async def test_a_cancelled_server_removes_its_socket_directory(tmp_path: Path) -> None:
    """serve() cancelled (the daemon's root nursery failing) still removes it."""
    before = listening_unix_sockets()
    console = ConsoleServer(
        console_app(tmp_path), CappedRelay(ConnectionLimits()), graceful_timeout=1.0
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(console.serve, "127.0.0.1", 0)
        (name,) = listening_unix_sockets() - before
        directory = private_socket_directory(name)
        nursery.cancel_scope.cancel()
    assert not directory.exists()


def test_hypercorn_limits_are_configured() -> None:
    """The bounds the module docstring promises are the ones hypercorn gets."""
    config = server.hypercorn_config(99, graceful_timeout=5.0)
    assert config.bind == ["fd://99"]
    assert (config.h11_max_incomplete_size, config.h2_max_header_list_size) == (16384, 16384)
    assert (config.keep_alive_timeout, config.read_timeout) == (10.0, 10)
    assert (config.h2_max_concurrent_streams, config.backlog) == (16, 128)
    assert config.graceful_timeout == 5.0 and config.accesslog is None
