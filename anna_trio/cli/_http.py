"""annactl's way of talking to a node: one request over our own client, TLS from peers.yml."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PEERS = "/etc/anna/peers.yml"
REQUEST_BUDGET = 15.0


def add_node_arguments(parser: Any, *, json_output: bool = True) -> None:
    """The options of every command that talks to a running node, the same everywhere."""
    parser.add_argument(
        "--node",
        help="node URL (default https://127.0.0.1:8001, http when peers.yml allows insecure peers)",
    )
    parser.add_argument(
        "--peers",
        default=os.environ.get("ANNA_PEERS", DEFAULT_PEERS),
        help="peers.yml for TLS client settings",
    )
    parser.add_argument("--ca-cert", metavar="FILE", help="cluster CA (default: peers.yml's)")
    parser.add_argument(
        "--client-cert", metavar="FILE", help="client certificate (default: peers.yml's)"
    )
    parser.add_argument("--client-key", metavar="FILE", help="its key (default: peers.yml's)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _client_tls(args: Any) -> tuple[ssl.SSLContext | None, bool]:
    """(client context, insecure allowed) from peers.yml, each file overridable by its
    flag; no peers.yml and no flags means plain defaults."""
    import attrs

    from ..models import TlsConfig
    from ..tls import client_context

    overrides = {
        key: Path(value)
        for key, value in (
            ("ca_cert", args.ca_cert),
            ("client_cert", args.client_cert),
            ("client_key", args.client_key),
        )
        if value
    }
    peers_file = Path(args.peers)
    tls, insecure = TlsConfig(), False
    if peers_file.exists():
        from ..config import load_cluster_config

        config = load_cluster_config(peers_file, node_id=None, check_tls_files=False)
        tls, insecure = config.tls, config.allow_insecure_peers
    if overrides:
        tls = attrs.evolve(tls, enabled=True, **overrides)
    return (client_context(tls) if tls.enabled else None), insecure


def call(
    args: Any, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request to the node named by --node; returns (status, decoded JSON)."""
    import trio

    from ..transport.client import HttpClient

    context, insecure = _client_tls(args)
    url = args.node or (
        "http://127.0.0.1:8001" if insecure and context is None else "https://127.0.0.1:8001"
    )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--node: expected http(s)://HOST:PORT, got {url!r}")
    if parts.scheme == "https" and context is None:
        raise ValueError(f"--node {url} is https but {args.peers} has no tls client settings")
    port = parts.port or (443 if parts.scheme == "https" else 80)

    async def go() -> tuple[int, Any]:
        client = HttpClient(
            parts.hostname or "127.0.0.1",
            port,
            ssl_context=context if parts.scheme == "https" else None,
            server_hostname=parts.hostname if parts.scheme == "https" else None,
        )
        try:
            with trio.fail_after(REQUEST_BUDGET):
                response = await client.request(method, path, json_body=body, headers=headers)
        finally:
            await client.aclose()
        return response.status, response.json()

    return trio.run(go)
