"""The testnet's folder: endpoints, keys, a CA, certificates and peers files (SPEC §10).

Layout under DIR (default ./artifacts/testnet):
    ca/{ca.pem,ca.key,crl.pem}
    nodeN/{peers.yml, keys/node_id.sec, tls/node_00N.{pem,key}, audit.jsonl, annad.log, annad.pid}
    round_{1,2,3}/node_{1,2,3}.json, node_{1,2,3}_metrics.txt, summary.json
TLS paths in peers.yml are relative to it, so the same files serve containers (compose).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import attrs

from .. import crypto, pki

RPC_BASE = 8000
METRICS_BASE = 9000
ROUND_TIMEOUT = 2.0
READY_TIMEOUT = 30.0
SCENARIO_TIMEOUT = 30.0
LAYOUT_FILE = "testnet.json"


def node_id(n: int) -> str:
    return f"node_{n:03d}"


@attrs.frozen
class NodeEndpoint:
    n: int
    rpc_port: int
    metrics_port: int
    host: str = "127.0.0.1"

    @property
    def node_id(self) -> str:
        return node_id(self.n)

    @property
    def node_dir_name(self) -> str:
        return f"node{self.n}"


@attrs.frozen
class Layout:
    """Where a local cluster lives and listens; saved as testnet.json in its folder."""

    directory: Path
    rpc_ports: tuple[int, ...] = (8001, 8002, 8003)
    metrics_ports: tuple[int, ...] = (9001, 9002, 9003)
    hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.1", "127.0.0.1")
    tls: bool = True
    round_timeout: float = ROUND_TIMEOUT

    @property
    def endpoints(self) -> list[NodeEndpoint]:
        return [
            NodeEndpoint(i + 1, rpc, metrics, host)
            for i, (rpc, metrics, host) in enumerate(
                zip(self.rpc_ports, self.metrics_ports, self.hosts, strict=True)
            )
        ]

    def node_dir(self, n: int) -> Path:
        return self.directory / f"node{n}"

    def save(self) -> None:
        data = attrs.asdict(self)
        data["directory"] = None
        (self.directory / LAYOUT_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Layout:
        """The saved layout of a testnet folder, or the default one (SPEC §10 ports)."""
        path = directory / LAYOUT_FILE
        if not path.exists():
            return cls(directory)
        data = json.loads(path.read_text())
        data["directory"] = directory
        for key in ("rpc_ports", "metrics_ports", "hosts"):
            data[key] = tuple(data[key])
        return cls(**data)


def free_layout(
    directory: Path, nodes: int, *, tls: bool = True, round_timeout: float = ROUND_TIMEOUT
) -> Layout:
    """A layout on free loopback ports (tests and benchmarks)."""
    import socket

    sockets = [socket.socket() for _ in range(2 * nodes)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        ports = [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    return Layout(
        directory,
        tuple(ports[:nodes]),
        tuple(ports[nodes:]),
        ("127.0.0.1",) * nodes,
        tls,
        round_timeout,
    )


# --- init ----------------------------------------------------------------------------------


def init(layout: Layout, *, compose: bool = False, force: bool = False) -> None:
    """Keys, CA, certificates and peers files for every node. Refuses to clobber unless forced."""
    directory = layout.directory
    if directory.exists() and any(directory.iterdir()):
        if not force:
            raise FileExistsError(f"{directory} is not empty (use --force to recreate it)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout.save()
    if layout.tls:
        pki.init_ca(directory / "ca")
    pubkeys = {}
    for ep in layout.endpoints:
        node_dir = layout.node_dir(ep.n)
        key = crypto.create_keypair(node_dir / "keys")
        pubkeys[ep.n] = crypto.public_key_hex(key)
        if layout.tls:
            pki.issue_cert(
                directory / "ca",
                node_id=ep.node_id,
                sans=["localhost", ep.host, f"anna-node-{ep.n}"],
                out_dir=node_dir / "tls",
            )
    for ep in layout.endpoints:
        (layout.node_dir(ep.n) / "peers.yml").write_text(
            peers_yaml(layout, ep.n, pubkeys, compose=compose)
        )


def peers_yaml(layout: Layout, me: int, pubkeys: dict[int, str], *, compose: bool) -> str:
    cert = f"tls/{node_id(me)}"
    if layout.tls:
        lines = [
            "# anna-trio testnet peers file (annactl testnet init)",
            "allow_insecure_peers: false",
            "tls:",
            "  enabled: true",
            "  ca_cert: ../ca/ca.pem",
            f"  server_cert: {cert}.pem",
            f"  server_key: {cert}.key",
            f"  client_cert: {cert}.pem",
            f"  client_key: {cert}.key",
            "  crl: ../ca/crl.pem",
        ]
    else:
        lines = ["# anna-trio testnet peers file (plain HTTP)", "allow_insecure_peers: true"]
    lines += [
        "quorum: majority",
        "byzantine_deviation_threshold: 0.3",
        "byzantine_window_count: 3",
        "peers:",
    ]
    for ep in layout.endpoints:
        lines += [
            f"  - node_id: {ep.node_id}",
            f"    address: {f'anna-node-{ep.n}' if compose else ep.host}",
            f"    port: {ep.rpc_port}",
            f"    pubkey: {pubkeys[ep.n]}",
        ]
    return "\n".join(lines) + "\n"


# --- up / down -----------------------------------------------------------------------------
