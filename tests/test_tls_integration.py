"""mTLS against real annad processes (SPEC §6, §7): who is refused, where it is counted.

One 3-node TLS cluster serves the module; every test leaves it as it found it and
ends by showing that a valid client still gets through.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from _launch import (
    LiveCluster,
    metric,
    peers_file,
    poll,
    read_peers,
    reload,
    round_everywhere,
    write_peers,
)
from anna_trio import crypto, pki, tls
from anna_trio._exceptions import PeerError
from anna_trio.testnet import Cluster
from anna_trio.transport.client import HttpClient, PeerTLSError, Response

pytestmark = pytest.mark.integration


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def node_context(nodes: LiveCluster, n: int = 1) -> ssl.SSLContext:
    """What node n presents as a client: the valid path."""
    directory = nodes.layout.directory
    cert = nodes.layout.node_dir(n) / "tls" / f"node_00{n}"
    return client_context(
        directory / "ca" / "ca.pem", cert.with_suffix(".pem"), cert.with_suffix(".key")
    )


async def health(
    nodes: LiveCluster, n: int, context: ssl.SSLContext | None, **client_options: object
) -> Response:
    """GET /health on node n's RPC port over a brand-new connection."""
    ep = nodes.layout.endpoints[n - 1]
    client = HttpClient(
        ep.host,
        ep.rpc_port,
        ssl_context=context,
        server_hostname=ep.host if context else None,
        **client_options,  # type: ignore[arg-type]
    )
    try:
        return await client.request("GET", "/health")
    finally:
        await client.aclose()


async def assert_refused(
    cluster: Cluster, nodes: LiveCluster, context: ssl.SSLContext | None, reason: str
) -> None:
    """Node 1 refuses the connection and counts a server-side handshake failure for `reason`;
    a TLS client learns of the refusal from node 1's alert, not from a bare close."""
    before = await metric(
        cluster, 1, "anna_tls_handshake_failures_total", side="server", reason=reason
    )
    with pytest.raises(PeerError) as refused:
        await health(nodes, 1, context)
    if context is not None:
        assert isinstance(refused.value, PeerTLSError), refused.value
        assert refused.value.reason == "rejected_by_peer", refused.value

    async def counted() -> bool:
        now = await metric(
            cluster, 1, "anna_tls_handshake_failures_total", side="server", reason=reason
        )
        return now > before

    await poll(
        f'anna_tls_handshake_failures_total{{side="server",reason="{reason}"}} to grow', counted
    )
    assert (await health(nodes, 1, node_context(nodes))).status == 200


async def test_valid_client_certificate_is_served(cluster: Cluster, nodes: LiveCluster) -> None:
    """A client with a node certificate from the cluster CA gets answers on every node."""
    for n in (1, 2, 3):
        response = await health(nodes, n, node_context(nodes))
        assert response.status == 200
        assert response.json()["node_id"] == f"node_00{n}"


async def test_client_without_certificate_is_refused(cluster: Cluster, nodes: LiveCluster) -> None:
    """No client certificate: refused at the handshake, counted as no_certificate."""
    ca = nodes.layout.directory / "ca" / "ca.pem"
    await assert_refused(cluster, nodes, client_context(ca), "no_certificate")


async def test_certificate_from_another_ca_is_refused(
    cluster: Cluster, nodes: LiveCluster, tmp_path: Path
) -> None:
    """A certificate signed by a foreign CA (even with a validator's CN) is refused."""
    pki.init_ca(tmp_path / "other_ca")
    cert, key = pki.issue_cert(
        tmp_path / "other_ca", node_id="node_001", sans=["127.0.0.1"], out_dir=tmp_path / "c"
    )
    ca = nodes.layout.directory / "ca" / "ca.pem"
    await assert_refused(cluster, nodes, client_context(ca, cert, key), "unknown_ca")


async def test_expired_certificate_is_refused(
    cluster: Cluster, nodes: LiveCluster, tmp_path: Path
) -> None:
    """A cluster-CA certificate past its not_after is refused as expired."""
    now = datetime.now(UTC)
    cert, key = pki.issue_cert(
        nodes.layout.directory / "ca",
        node_id="node_001",
        sans=["127.0.0.1"],
        out_dir=tmp_path,
        not_before=now - timedelta(days=10),
        not_after=now - timedelta(days=1),
    )
    ca = nodes.layout.directory / "ca" / "ca.pem"
    await assert_refused(cluster, nodes, client_context(ca, cert, key), "certificate_expired")


async def test_revoked_certificate_is_refused_after_sighup(
    cluster: Cluster, nodes: LiveCluster, tmp_path: Path
) -> None:
    """Revoking a certificate and SIGHUPping the node refuses it; valid clients still pass."""
    ca_dir = nodes.layout.directory / "ca"
    cert, key = pki.issue_cert(ca_dir, node_id="node_002", sans=["127.0.0.1"], out_dir=tmp_path)
    context = client_context(ca_dir / "ca.pem", cert, key)
    assert (await health(nodes, 1, context)).status == 200
    assert pki.revoke(ca_dir, cert)
    answer = await reload(cluster, nodes, 1, "success")
    assert answer["last_reload"]["result"] == "success"
    await assert_refused(cluster, nodes, context, "certificate_revoked")


async def test_server_with_another_node_id_is_refused(cluster: Cluster, nodes: LiveCluster) -> None:
    """Dialling node 3 while expecting node_002: the CN check refuses it after the handshake."""

    def expect_node_002(ssl_object: ssl.SSLObject) -> str | None:
        return tls.check_peer_identity(
            ssl_object, expected_node_id="node_002", pinned_fingerprint=None
        )

    with pytest.raises(PeerTLSError) as refused:
        await health(nodes, 3, node_context(nodes), verify_peer=expect_node_002)
    assert refused.value.reason.startswith("cn_mismatch"), refused.value.reason

    def expect_node_003(ssl_object: ssl.SSLObject) -> str | None:
        return tls.check_peer_identity(
            ssl_object, expected_node_id="node_003", pinned_fingerprint=None
        )

    assert (await health(nodes, 3, node_context(nodes), verify_peer=expect_node_003)).status == 200


async def test_wrong_fingerprint_pin_keeps_the_peer_down(
    cluster: Cluster, nodes: LiveCluster
) -> None:
    """Node 1 pinning a wrong fingerprint for node_002 never talks to it; node_003's right pin works."""
    original = peers_file(nodes, 1).read_text()
    document = read_peers(nodes, 1)
    for peer in document["peers"]:
        if peer["node_id"] == "node_002":
            peer["fingerprint"] = "ab" * 32
        if peer["node_id"] == "node_003":
            cert = nodes.layout.node_dir(3) / "tls" / "node_003.pem"
            peer["fingerprint"] = pki.fingerprint(cert)
    try:
        write_peers(nodes, 1, document)
        before = await metric(
            cluster,
            1,
            "anna_tls_handshake_failures_total",
            side="client",
            reason="fingerprint_mismatch",
        )
        answer = await reload(cluster, nodes, 1, "success")
        assert answer["last_reload"]["result"] == "success"

        async def refused_repeatedly() -> bool:
            failures = await metric(
                cluster,
                1,
                "anna_tls_handshake_failures_total",
                side="client",
                reason="fingerprint_mismatch",
            )
            return failures >= before + 3

        await poll("node 1 to count fingerprint mismatches against node_002", refused_repeatedly)
        assert await metric(cluster, 1, "anna_peer_up", peer="node_002") == 0
        assert await metric(cluster, 1, "anna_peer_up", peer="node_003") == 1
        peers = {
            p["node_id"]: p["up"] for p in (await cluster.rpc(1, "GET", "/rpc/status"))[1]["peers"]
        }
        assert peers == {"node_002": False, "node_003": True}
    finally:
        write_peers(nodes, 1, original)
        await reload(cluster, nodes, 1, "success")

    async def node_002_back() -> bool:
        return await metric(cluster, 1, "anna_peer_up", peer="node_002") == 1

    await poll("node 1's link to node_002 up again with the pin removed", node_002_back)


async def test_plain_http_to_the_tls_port_is_refused(cluster: Cluster, nodes: LiveCluster) -> None:
    """Plain HTTP to the RPC port gets no answer and is counted as a protocol failure."""
    await assert_refused(cluster, nodes, None, "protocol")


async def test_rounds_complete_over_mtls(cluster: Cluster, nodes: LiveCluster) -> None:
    """After all the refusals above, the cluster still completes a round with all three nodes."""
    code, _ = await cluster.rpc(1, "POST", "/rpc/round/start", {"round_id": "tls_valid_path"})
    assert code == 202
    await round_everywhere(
        cluster, "tls_valid_path", [1, 2, 3], {"node_001", "node_002", "node_003"}
    )


def test_tls_required_without_tls_exits_78(tmp_path: Path) -> None:
    """allow_insecure_peers: false without a tls block: annad exits 78 saying TLS is required."""
    key = crypto.create_keypair(tmp_path / "keys")
    (tmp_path / "peers.yml").write_text(
        "allow_insecure_peers: false\n"
        "peers:\n"
        "  - node_id: node_001\n"
        "    address: 127.0.0.1\n"
        "    port: 18001\n"
        f"    pubkey: {crypto.public_key_hex(key)}\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "anna_trio.cli.annad",
            "--node-id",
            "node_001",
            "--state-dir",
            str(tmp_path),
            "--peers",
            str(tmp_path / "peers.yml"),
            "--audit-log",
            str(tmp_path / "audit.jsonl"),
            "--pid-file",
            str(tmp_path / "annad.pid"),
            "--rpc-listen",
            "127.0.0.1:18001",
            "--metrics-listen",
            "127.0.0.1:19001",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78, result.stderr
    assert "TLS is required" in result.stderr
    assert not (tmp_path / "annad.pid").exists()
