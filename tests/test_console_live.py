"""The metrics listener of a live annad under attack, and with the console off.

Issue 16's requests that crashed or exhausted the node, on this port: unparseable
targets, a connection flood from many loopback addresses (127.0.0.2 and up, beyond the
cap) and clients that never read. The node lives, holds at most the cap, stays small,
keeps answering scrapes and the RPC port, and logs no traceback. With the console off
(`ANNA_CONSOLE=false`) the machine endpoints answer (/metrics, /health, /ready, the
failpoints) and nothing else does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import trio

from _launch import LiveCluster, metric, poll
from anna_trio.console.listener import ConnectionLimits
from anna_trio.transport.client import HttpClient

pytestmark = pytest.mark.integration

LIMITS = ConnectionLimits()
CRASHERS = (
    b"GET //[ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://[::1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://[::1]:x/metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 40_000 + b"\r\n\r\n",
    b"\r\n" * 1000,
)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


async def raw(host: str, port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    received = b""
    with trio.move_on_after(3):
        try:
            await stream.send_all(data)
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass
    await stream.aclose()
    return received


async def connect_from(
    address: str, host: str, port: int, receive_buffer: int | None = None
) -> trio.SocketStream:
    """A TCP connection to host:port from the loopback address `address`."""
    sock = trio.socket.socket()
    if receive_buffer is not None:  # a small window: a client that does not read is stuck soon
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, receive_buffer)
    await sock.bind((address, 0))
    await sock.connect((host, port))
    return trio.SocketStream(sock)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def assert_healthy(nodes: LiveCluster, n: int) -> None:
    assert nodes.processes[n].poll() is None, "annad died"
    log = nodes.log(n)
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 300) :][:3000]


async def test_the_metrics_listener_survives_what_crashed_or_exhausted_the_node(
    cluster_factory: Callable[..., LiveCluster],
) -> None:
    """Crashing targets are answered, never 500; a flood of connections from 8 addresses is held to the
    cap (each relayed connection holds 3 descriptors: client socket, relay to hypercorn,
    hypercorn's end) while the RPC port answers and scrapes get their turn; clients that
    never read are dropped; RSS stays within idle + 100 MiB; no traceback."""
    nodes = await trio.to_thread.run_sync(lambda: cluster_factory(nodes=1, tls=True))
    ep = nodes.endpoint(1)
    pid = nodes.pid(1)
    for data in CRASHERS:  # an answer (4xx, or 200 for a valid absolute URL) or a close
        answer = await raw(ep.host, ep.metrics_port, data)
        assert not answer or answer[9:10] in b"24", answer[:200]
    idle_rss, idle_fds = rss_mib(pid), open_fds(pid)

    streams: list[trio.SocketStream] = []
    try:
        for _ in range(2):
            stream = await connect_from("127.0.0.20", ep.host, ep.metrics_port, 4096)
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
            streams.append(stream)
        for a in range(2, 10):
            for _ in range(40):  # 8 x 40 = 320 > the cap of 256; 40 < 64 per address
                streams.append(await connect_from(f"127.0.0.{a}", ep.host, ep.metrics_port))
        await trio.sleep(1.0)
        held = open_fds(pid) - idle_fds
        assert 3 * 200 < held <= 3 * LIMITS.max_connections, held
        assert rss_mib(pid) < idle_rss + 100
        async with nodes.connect() as client:
            assert (await client.rpc(1, "GET", "/rpc/status"))[0] == 200

            async def scraped() -> bool:  # waits in the backlog until hypercorn idles slots out
                with trio.move_on_after(5):
                    return (await client.plain(1, "GET", "/health"))[0] == 200
                return False

            await poll("a scrape served during the flood", scraped, within=40)

            async def dropped() -> bool:
                return (
                    await metric(
                        client,
                        1,
                        "anna_listener_dropped_connections_total",
                        listener="metrics",
                        reason="send_timeout",
                    )
                    > 0
                )

            await poll("a client that never reads dropped", dropped, within=40)
            assert open_fds(pid) - idle_fds <= 3 * LIMITS.max_connections
    finally:
        for stream in streams:
            await stream.aclose()
    assert rss_mib(pid) < idle_rss + 100
    assert_healthy(nodes, 1)


def test_console_off_leaves_the_machine_endpoints(
    cluster_factory: Callable[..., LiveCluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ANNA_CONSOLE=false: /, /rounds/…, /byzantine/… are 404; /metrics, /health, /ready
    and the failpoints answer as before."""
    monkeypatch.setenv("ANNA_CONSOLE", "false")
    nodes = cluster_factory(nodes=1, tls=True)
    ep = nodes.endpoint(1)

    async def check() -> list[tuple[str, int, Any]]:
        answers = []
        client = HttpClient(ep.host, ep.metrics_port)
        try:
            for method, path in (
                ("GET", "/"),
                ("GET", "/rounds/r1"),
                ("GET", "/byzantine/node_001"),
                ("GET", "/static/console.css"),
                ("GET", "/metrics"),
                ("GET", "/health"),
                ("GET", "/ready"),
                ("DELETE", "/debug/failpoints/store.before_commit"),
            ):
                response = await client.request(method, path)
                body = response.json() if response.status != 200 or path != "/metrics" else None
                answers.append((path, response.status, body))
        finally:
            await client.aclose()
        return answers

    answers = trio.run(check)
    assert [(path, status) for path, status, _ in answers] == [
        ("/", 404),
        ("/rounds/r1", 404),
        ("/byzantine/node_001", 404),
        ("/static/console.css", 404),
        ("/metrics", 200),
        ("/health", 200),
        ("/ready", 200),
        ("/debug/failpoints/store.before_commit", 200),
    ]
    assert all(body["error"] == "not_found" for _, status, body in answers if status == 404)
    assert answers[5][2]["node_id"] == "node_001"
    assert os.environ["ANNA_CONSOLE"] == "false"
    assert json.dumps(answers[7][2]) == '{"success": true, "armed": {}}'
