"""What one peer exchange costs: our HttpClient -> HttpServer, mTLS, two processes.

Back to back (both processes stay hot) and with a pause between requests (each request
wakes an idle process, as in a cluster where a node is asked a few times a round).
Prints one JSON document: CPU per request on each side and wall time per request.
Two floors under it, with a client on blocking stdlib sockets sending bytes of about the
same sizes: `raw_sockets` answers from a blocking stdlib server (the kernel's share),
`trio_sockets` from a trio SocketStream echo loop (what trio's run loop adds, without
TLS, HTTP or a handler). The rest of our server's CPU is TLS, HTTP and the handler.

    python benchmarks/bench_exchange.py [--requests 2000] [--pause-ms 5]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from _common import cpu_seconds

from anna_trio import pki, tls
from anna_trio.models import Limits, TlsConfig
from anna_trio.transport.client import HttpClient
from anna_trio.transport.server import HttpServer, Request, Response, json_response

BODY = b'{"from":"node_001","rounds":[],"observations":[],"evidence":[]}'
# The sizes on the wire of one exchange above: request head + BODY, and the answer.
RAW_REQUEST_BYTES = 200
RAW_ANSWER = b"y" * 180


def _config(directory: Path) -> TlsConfig:
    cert, key = directory / "n1" / "node_001.pem", directory / "n1" / "node_001.key"
    return TlsConfig(
        enabled=True,
        ca_cert=directory / "ca" / pki.CA_CERT_NAME,
        server_cert=cert,
        server_key=key,
        client_cert=cert,
        client_key=key,
    )


async def _serve(directory: Path) -> None:
    async def handler(request: Request) -> Response:
        return json_response(200, {"success": True, "accepted": 0})

    server = HttpServer(handler, limits=Limits, ssl_context=tls.server_context(_config(directory)))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        (directory / "port").write_text(str(port))


async def _measure(directory: Path, requests: int, pause: float) -> dict[str, float]:
    port = int((directory / "port").read_text())
    client = HttpClient(
        "127.0.0.1",
        port,
        ssl_context=tls.client_context(_config(directory)),
        server_hostname="127.0.0.1",
    )
    headers = {"content-type": "application/json"}
    await client.request("POST", "/rpc/gossip", body=BODY, headers=headers)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        await client.request("POST", "/rpc/gossip", body=BODY, headers=headers)
        if pause:
            await trio.sleep(pause)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall - requests * pause
    await client.aclose()
    return {"client_cpu_ms": 1e3 * cpu / requests, "wall_ms": 1e3 * wall / requests}


def _serve_raw(directory: Path) -> None:
    """One connection: every read is a request, answered with RAW_ANSWER bytes."""
    listener = socket.create_server(("127.0.0.1", 0))
    (directory / "port").write_text(str(listener.getsockname()[1]))
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    while connection.recv(65536):
        connection.sendall(RAW_ANSWER)


async def _serve_trio(directory: Path) -> None:
    """The raw server's loop on a trio SocketStream."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    (directory / "port").write_text(str(listeners[0].socket.getsockname()[1]))
    stream = await listeners[0].accept()
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    while await stream.receive_some(65536):
        await stream.send_all(RAW_ANSWER)


def _measure_raw(directory: Path, requests: int, pause: float) -> dict[str, float]:
    port = int((directory / "port").read_text())
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        request = b"x" * RAW_REQUEST_BYTES
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(requests):
            connection.sendall(request)
            received = 0
            while received < len(RAW_ANSWER):
                received += len(connection.recv(65536))
            if pause:
                time.sleep(pause)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall - requests * pause
    return {"client_cpu_ms": 1e3 * cpu / requests, "wall_ms": 1e3 * wall / requests}


def run(directory: Path, requests: int, pause: float, *, server: str = "ours") -> dict[str, Any]:
    """`server` is "ours" (HttpServer and HttpClient, mTLS), "raw" or "trio" (the floors)."""
    (directory / "port").unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, __file__, f"--serve-{server}", str(directory)])
    try:
        deadline = time.monotonic() + 30
        while not (directory / "port").exists():
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit("the server process did not start")
            time.sleep(0.05)
        before = cpu_seconds(process.pid)
        if server == "ours":
            result = trio.run(_measure, directory, requests, pause)
        else:
            result = _measure_raw(directory, requests, pause)
        result["server_cpu_ms"] = 1e3 * (cpu_seconds(process.pid) - before) / requests
    finally:
        process.terminate()
        process.wait(timeout=10)
    return {k: round(v, 3) for k, v in result.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--pause-ms", type=float, default=5.0)
    parser.add_argument("--serve-ours", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-raw", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-trio", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_ours:
        trio.run(_serve, args.serve_ours)
        return 0
    if args.serve_raw:
        _serve_raw(args.serve_raw)
        return 0
    if args.serve_trio:
        trio.run(_serve_trio, args.serve_trio)
        return 0
    with tempfile.TemporaryDirectory(prefix="anna-exchange-") as temp:
        directory = Path(temp)
        pki.init_ca(directory / "ca")
        pki.issue_cert(
            directory / "ca", node_id="node_001", sans=["127.0.0.1"], out_dir=directory / "n1"
        )
        pause, pause_key = args.pause_ms / 1e3, f"pause_{args.pause_ms:g}_ms"
        report = {
            "benchmark": "bench_exchange",
            "requests": args.requests,
            "back_to_back": run(directory, args.requests, 0.0),
            pause_key: run(directory, args.requests // 2, pause),
            **{
                f"{floor}_sockets": {
                    "back_to_back": run(directory, args.requests, 0.0, server=floor),
                    pause_key: run(directory, args.requests // 2, pause, server=floor),
                }
                for floor in ("raw", "trio")
            },
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
