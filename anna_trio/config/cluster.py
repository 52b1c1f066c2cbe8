"""peers.yml, the cluster config (SPEC §6): read at the edge, judged by pure rules.

`load_cluster_config` is the edge: it reads the file and, with TLS on, the
certificate files and the clock (`tls.check_tls_material`). Everything else here is
pure: the converter structures the document into a ClusterConfig, and the rules that
span fields (TLS or insecure, unique ids and addresses, this node present, the TLS
files when TLS is on) judge the fields that are valid each on its own, so one bad
value does not hide the other problems. Start-up, a SIGHUP reload and `annactl config check` all
come here and report the same problems, each with its line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from ..converter import valid_fields
from ..models import TLS_FILES, ClusterConfig, PeerConfig, TlsConfig
from .yamlfile import Document, Source, resolve_paths

TLS_REQUIRED_MESSAGE = (
    "TLS is required: set tls.enabled: true with certificates, or allow_insecure_peers: true"
)


@attrs.frozen
class _Parts:
    """What the cross-field rules judge: the valid parts, defaults for the others (as
    the node would run if only the reported problems were fixed)."""

    allow_insecure_peers: bool
    tls: TlsConfig
    peers: list[dict[str, Any]]  # each item's valid fields, by name


def load_cluster_config(
    path: Path, *, node_id: str | None, check_tls_files: bool = True
) -> ClusterConfig:
    """Read and validate peers.yml; ConfigError.problems lists every problem found."""
    document = Document.parse(Source.read(Path(path)))
    config, tls = parse_cluster_config(document, node_id=node_id)
    if check_tls_files and tls is not None:
        from .. import pki  # x509 is needed only with TLS

        add_tls_material_problems(document, pki.check_tls_material(tls))
    document.problems.raise_if_any()
    assert config is not None
    return config


def parse_cluster_config(
    document: Document, *, node_id: str | None
) -> tuple[ClusterConfig | None, TlsConfig | None]:
    """The config of a parsed peers.yml, its problems recorded in the document (the
    config is None when its parts are invalid), and the TLS block when it is complete
    enough for its files to be checked."""
    data = document.data
    if document.problems:
        return None, None  # unreadable, or not YAML: nothing more to say
    if data is None:
        document.add((), "the file is empty; expected the settings of SPEC §6")
        return None, None
    if not isinstance(data, dict):
        document.add((), "must be a mapping (see SPEC §6)")
        return None, None
    config = document.structure(data, ClusterConfig)
    base = document.problems.file.parent
    if config is not None:
        config = resolve_paths(config, base)
    top = valid_fields(data, ClusterConfig)
    items = data.get("peers")
    parts = _Parts(
        top.get("allow_insecure_peers", False),
        resolve_paths(top.get("tls", TlsConfig()), base),
        [
            valid_fields(item, PeerConfig) if isinstance(item, Mapping) else {}
            for item in (items if isinstance(items, list) else [])
        ],
    )
    _judge(document, parts, node_id)
    checkable = parts.tls.enabled and not document.problems.under("tls")
    return config, parts.tls if checkable else None


def _judge(document: Document, parts: _Parts, node_id: str | None) -> None:
    """The rules across fields."""
    tls = parts.tls
    if tls.enabled:
        for key in TLS_FILES:
            if getattr(tls, key) is None:
                document.add(("tls", key), "is required when tls.enabled is true")
    elif not parts.allow_insecure_peers:
        anchor = "tls" if "tls" in document.data else "allow_insecure_peers"
        document.add(("tls",), TLS_REQUIRED_MESSAGE, line=document.line((anchor,)))
    if parts.peers:
        _check_unique(document, parts.peers)
        if node_id is not None and all(peer.get("node_id") != node_id for peer in parts.peers):
            document.add(("peers",), f"this node ({node_id}) is not in the peer list")


def _check_unique(document: Document, peers: list[dict[str, Any]]) -> None:
    """Node ids and address:port pairs must each appear once (SPEC §6)."""
    first_id: dict[str, int] = {}
    first_endpoint: dict[tuple[str, int], int] = {}
    for index, peer in enumerate(peers):
        node_id = peer.get("node_id")
        if node_id is not None:
            id_line = document.line(("peers", index, "node_id"))
            if node_id in first_id:
                document.add(
                    ("peers", index, "node_id"),
                    f"duplicate node id {node_id!r} (first at line {first_id[node_id]})",
                )
            first_id.setdefault(node_id, id_line)
        address, port = peer.get("address"), peer.get("port")
        if address is not None and port is not None:
            address_line = document.line(("peers", index, "address"))
            endpoint = (address.lower(), port)
            if endpoint in first_endpoint:
                document.add(
                    ("peers", index, "address"),
                    f"duplicate address:port {address}:{port} "
                    f"(first at line {first_endpoint[endpoint]})",
                )
            first_endpoint.setdefault(endpoint, address_line)


def add_tls_material_problems(document: Document, messages: list[str]) -> None:
    """Record what tls.check_tls_material found. Its messages start with the field
    (`tls.server_cert: ...`); each is reported at that key's line, or at the `tls:`
    line when it names no key of the block."""
    block: Any = document.data.get("tls", {})
    for message in messages:
        field, separator, rest = message.partition(": ")
        key = field.removeprefix("tls.")
        if separator and field.startswith("tls.") and key in block:
            document.add(("tls", key), rest)
        else:
            document.add(("tls",), message)


def diff_peers(old: ClusterConfig, new: ClusterConfig) -> tuple[list[str], list[str], list[str]]:
    """Node ids (added, removed, changed), each sorted: what a reload must restart."""
    old_peers = {peer.node_id: peer for peer in old.peers}
    new_peers = {peer.node_id: peer for peer in new.peers}
    added = sorted(new_peers.keys() - old_peers.keys())
    removed = sorted(old_peers.keys() - new_peers.keys())
    changed = sorted(
        node for node in old_peers.keys() & new_peers.keys() if old_peers[node] != new_peers[node]
    )
    return added, removed, changed


def self_port_change(old: ClusterConfig, new: ClusterConfig, node_id: str) -> str | None:
    """Why a reload must be refused when it moves this node's own port, else None."""
    before, after = old.peer(node_id), new.peer(node_id)
    if before is None or after is None or before.port == after.port:
        return None
    return f"restart required: this node's port changed from {before.port} to {after.port}"
