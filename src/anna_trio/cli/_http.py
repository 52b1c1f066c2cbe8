"""annactl's way of talking to a node: one request over our own client, TLS from peers.yml."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PEERS = "/etc/anna/peers.yml"
REQUEST_BUDGET = 15.0


def add_node_arguments(parser: Any) -> None:
    parser.add_argument(
        "--node",
        help="node URL (default https://127.0.0.1:8001, http when peers.yml allows insecure peers)",
    )
    parser.add_argument(
        "--peers",
        default=os.environ.get("ANNA_PEERS", DEFAULT_PEERS),
        help="peers.yml for TLS client settings",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _client_tls(peers_file: Path) -> tuple[ssl.SSLContext | None, bool]:
    """(client context, insecure allowed) from peers.yml; no file means plain defaults."""
    if not peers_file.exists():
        return None, False
    from ..config import load_cluster_config
    from ..tls import client_context

    config = load_cluster_config(peers_file, node_id=None, check_tls_files=False)
    if config.tls.enabled:
        return client_context(config.tls), config.allow_insecure_peers
    return None, config.allow_insecure_peers


def call(
    args: Any, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request to the node named by --node; returns (status, decoded JSON)."""
    import trio

    from ..transport.client import HttpClient

    context, insecure = _client_tls(Path(args.peers))
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
