"""Peer client cost: anna_trio's client against httpx, plain HTTP and mutual TLS.

Both clients talk to the same quart-trio app served by hypercorn in a *separate*
process, so `time.process_time()` in this process is the client's CPU alone (plus
trio's scheduler, which both pay). Prints one JSON document.

    python benchmarks/bench_client.py [--requests 3000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import ipaddress
import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

_PAYLOAD = {"round_id": "round_20261127T000000Z", "node_id": "node-2", "tis_overall": 0.5}


# --- certificates (the tls module is not used on purpose: this measures the client) ---


def _write_pki(directory: Path) -> None:
    """Throwaway CA, server cert (CN node-1, IP 127.0.0.1) and client cert (CN node-2)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(name: str, issuer: tuple[Any, Any] | None) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer[0].subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        )
        if issuer is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False,
            )
        cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert, key

    ca = issue("ca", None)
    issue("node-1", ca)
    issue("node-2", ca)


def _client_context(pki_dir: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    context.load_cert_chain(pki_dir / "node-2.crt", pki_dir / "node-2.key")
    return context


# --- the servers, run in a child process ---------------------------------------------

_CANNED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n"
    b'{"success":true}'
)


async def _answer_canned(stream: trio.abc.Stream) -> None:
    """Answer every request with one fixed response: isolates the client's own cost."""
    buffer = b""
    try:
        while data := await stream.receive_some(65536):
            buffer += data
            while b"\r\n\r\n" in buffer:
                head, _, rest = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                while len(rest) < length:
                    rest += await stream.receive_some(65536)
                buffer = rest[length:]
                await stream.send_all(_CANNED)
    except trio.BrokenResourceError:
        pass


def _serve(server: str, pki_dir: str | None) -> None:
    """Child process: serve on 127.0.0.1:0; print the port; run until stdin closes."""
    import hypercorn.trio
    from hypercorn.config import Config
    from quart import request
    from quart_trio import QuartTrio

    app = QuartTrio("bench")

    @app.post("/rpc/echo")
    async def echo() -> dict[str, Any]:
        return {"success": True, "got": await request.get_json()}

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.loglevel = "WARNING"
    server_context = None
    if pki_dir is not None:
        config.certfile = f"{pki_dir}/node-1.crt"
        config.keyfile = f"{pki_dir}/node-1.key"
        config.ca_certs = f"{pki_dir}/ca.crt"
        config.verify_mode = ssl.CERT_REQUIRED
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=config.ca_certs)
        server_context.load_cert_chain(config.certfile, config.keyfile)
        server_context.verify_mode = ssl.CERT_REQUIRED

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            if server == "hypercorn":
                binds = await nursery.start(functools.partial(hypercorn.trio.serve, app, config))
                port = int(binds[0].rsplit(":", 1)[1])
            elif server_context is None:
                listeners = await nursery.start(
                    functools.partial(trio.serve_tcp, _answer_canned, 0, host="127.0.0.1")
                )
                port = listeners[0].socket.getsockname()[1]
            else:
                listeners = await nursery.start(
                    functools.partial(
                        trio.serve_ssl_over_tcp,
                        _answer_canned,
                        0,
                        server_context,
                        host="127.0.0.1",
                        https_compatible=True,
                    )
                )
                port = listeners[0].transport_listener.socket.getsockname()[1]
            print(port, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    trio.run(serve)


# --- measurement ---------------------------------------------------------------------


async def _measure(send: Callable[[], Awaitable[None]], requests: int) -> dict[str, float]:
    for _ in range(min(200, requests)):
        await send()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        await send()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"requests_per_s": requests / wall, "client_cpu_us": cpu / requests * 1e6}


async def _anna(port: int, context: ssl.SSLContext | None, requests: int) -> dict[str, float]:
    from anna_trio.transport.client import HttpClient

    client = HttpClient("127.0.0.1", port, ssl_context=context)

    async def send() -> None:
        response = await client.request("POST", "/rpc/echo", json_body=_PAYLOAD)
        assert response.status == 200 and response.json()["success"]

    try:
        return await _measure(send, requests)
    finally:
        await client.aclose()


async def _httpx(port: int, context: ssl.SSLContext | None, requests: int) -> dict[str, float]:
    import httpx

    scheme = "https" if context else "http"
    url = f"{scheme}://127.0.0.1:{port}/rpc/echo"
    async with httpx.AsyncClient(verify=context or True) as client:

        async def send() -> None:
            response = await client.post(url, json=_PAYLOAD)
            assert response.status_code == 200 and response.json()["success"]

        return await _measure(send, requests)


async def _connect_ms(port: int, context: ssl.SSLContext | None, connections: int) -> float:
    """Wall time of a fresh connection plus one request (the handshake dominates with TLS)."""
    from anna_trio.transport.client import HttpClient

    started = time.perf_counter()
    for _ in range(connections):
        client = HttpClient("127.0.0.1", port, ssl_context=context)
        await client.request("POST", "/rpc/echo", json_body=_PAYLOAD)
        await client.aclose()
    return (time.perf_counter() - started) / connections * 1e3


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(run[key] for run in runs), 1) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", choices=["hypercorn", "canned"], help=argparse.SUPPRESS)
    parser.add_argument("--pki", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve, args.pki)
        return

    results: dict[str, Any] = {
        "requests": args.requests,
        "repeats": args.repeats,
        "unit": "client_cpu_us = CPU of the client process per request, server in another"
        " process; median of repeats",
    }
    with tempfile.TemporaryDirectory() as tmp:
        pki_dir = Path(tmp)
        _write_pki(pki_dir)
        for server_kind in ("hypercorn", "canned"):
            for mode in ("plain", "mtls"):
                command = [sys.executable, __file__, "--serve", server_kind]
                if mode == "mtls":
                    command += ["--pki", str(pki_dir)]
                server = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
                try:
                    assert server.stdout is not None
                    port = int(server.stdout.readline())
                    context = _client_context(pki_dir) if mode == "mtls" else None
                    entry: dict[str, Any] = {}
                    for name, run in (("anna", _anna), ("httpx", _httpx)):
                        entry[name] = _median(
                            [
                                trio.run(run, port, context, args.requests)
                                for _ in range(args.repeats)
                            ]
                        )
                    entry["cpu_ratio_httpx_over_anna"] = round(
                        entry["httpx"]["client_cpu_us"] / entry["anna"]["client_cpu_us"], 1
                    )
                    entry["anna_new_connection_ms"] = round(
                        trio.run(_connect_ms, port, context, 50), 2
                    )
                    results[f"{server_kind}.{mode}"] = entry
                finally:
                    assert server.stdin is not None
                    server.stdin.close()
                    server.wait(timeout=10)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
