"""SIGHUP reload of real annad processes (SPEC §6, §8 peer tasks): refusals, swaps, churn.

A shared 3-node TLS cluster serves the tests that leave it as they found it; adding
and removing a validator, and certificate rotation, get clusters of their own.
"""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from _launch import (
    LiveCluster,
    audit_entries,
    metric,
    metrics,
    peers_file,
    poll,
    read_peers,
    reload,
    round_everywhere,
    running,
    status,
    write_peers,
)
from anna_trio import pki
from anna_trio.coordinator import interval_round_id
from anna_trio.testnet import Cluster
from anna_trio.transport.client import HttpClient

pytestmark = pytest.mark.integration

ALL_THREE = {"node_001", "node_002", "node_003"}
OUTAGE = 30.0
"""How long a stopped peer stays stopped: the 30 s issue 5 names, well past the 2 s
request timeout and into the 10 s backoff cap."""


def _peer(document: dict[str, Any], node_id: str) -> dict[str, Any]:
    return next(p for p in document["peers"] if p["node_id"] == node_id)


def _bad_yaml(document: dict[str, Any]) -> str:
    return "peers: [\n  - node_id: {unclosed\n"


def _bad_port(document: dict[str, Any]) -> dict[str, Any]:
    _peer(document, "node_002")["port"] = "abc"
    return document


def _duplicate_id(document: dict[str, Any]) -> dict[str, Any]:
    _peer(document, "node_003")["node_id"] = "node_002"
    return document


def _missing_cert(document: dict[str, Any]) -> dict[str, Any]:
    document["tls"]["server_cert"] = "tls/renewed_but_never_copied.pem"
    return document


def _foreign_key(document: dict[str, Any]) -> dict[str, Any]:
    document["tls"]["server_key"] = "../node2/tls/node_002.key"
    return document


def _own_port(document: dict[str, Any]) -> dict[str, Any]:
    _peer(document, "node_001")["port"] += 1
    return document


BAD_FILES = [
    pytest.param(_bad_yaml, "not valid YAML", id="bad-yaml"),
    pytest.param(_bad_port, "port", id="port-not-a-number"),
    pytest.param(_duplicate_id, "duplicate node id", id="duplicate-node-id"),
    pytest.param(_missing_cert, "file not found", id="missing-certificate"),
    pytest.param(_foreign_key, "key does not match", id="key-not-matching-cert"),
    pytest.param(_own_port, "restart required", id="own-port-changed"),
]


async def _start_round(cluster: Cluster, n: int, round_id: str) -> None:
    code, data = await cluster.rpc(n, "POST", "/rpc/round/start", {"round_id": round_id})
    assert code == 202, data


async def _peers_up(cluster: Cluster, n: int, expected: set[str]) -> bool:
    peers = (await status(cluster, n))["peers"]
    return len(peers) == len(expected) and {p["node_id"] for p in peers if p["up"]} == expected


@pytest.mark.parametrize(("break_file", "reason"), BAD_FILES)
async def test_bad_file_keeps_the_running_config(
    cluster: Cluster, nodes: LiveCluster, break_file: Any, reason: str
) -> None:
    """A reload of a bad peers.yml is refused, reported everywhere, and changes nothing."""
    original = peers_file(nodes, 1).read_text()
    audits_before = len(audit_entries(nodes, 1, "peer_reload"))
    try:
        write_peers(nodes, 1, break_file(read_peers(nodes, 1)))
        answer = await reload(cluster, nodes, 1, "failure")
        assert answer["last_reload"]["result"] == "failure"
        assert reason in answer["last_reload"]["error"], answer["last_reload"]
        assert answer["last_reload"]["at"]
        assert await metric(cluster, 1, "anna_config_last_reload_successful") == 0
        assert "reload failed" in nodes.log(1) and reason in nodes.log(1).split("reload failed")[-1]
        entries = audit_entries(nodes, 1, "peer_reload")[audits_before:]
        assert [e["result"] for e in entries] == ["failure"], entries
        assert reason in entries[0]["error"]
        assert (answer["validator_count"], answer["quorum"]) == (3, 2)
        await poll(
            "node 1's links still up", lambda: _peers_up(cluster, 1, {"node_002", "node_003"})
        )
        round_id = f"after_bad_{reason.replace(' ', '_')}"
        await _start_round(cluster, 1, round_id)
        await round_everywhere(cluster, round_id, [1, 2, 3], ALL_THREE)
    finally:
        write_peers(nodes, 1, original)
    answer = await reload(cluster, nodes, 1, "success")
    assert answer["last_reload"] == {
        "result": "success",
        "at": answer["last_reload"]["at"],
        "error": None,
    }
    assert await metric(cluster, 1, "anna_config_last_reload_successful") == 1


async def test_valid_reload_reports_what_changed(cluster: Cluster, nodes: LiveCluster) -> None:
    """A valid reload counts success, updates last_reload and audits added/removed/changed."""
    original = peers_file(nodes, 1).read_text()
    document = read_peers(nodes, 1)
    _peer(document, "node_003")["fingerprint"] = pki.fingerprint(
        nodes.layout.node_dir(3) / "tls" / "node_003.pem"
    )
    try:
        write_peers(nodes, 1, document)
        answer = await reload(cluster, nodes, 1, "success")
        assert answer["last_reload"]["result"] == "success"
        assert answer["last_reload"]["error"] is None
        assert await metric(cluster, 1, "anna_config_last_reload_successful") == 1
        entry = audit_entries(nodes, 1, "peer_reload")[-1]
        assert (entry["result"], entry["added"], entry["removed"], entry["changed"]) == (
            "success",
            [],
            [],
            ["node_003"],
        )
        await poll(
            "the restarted link to node_003 up",
            lambda: _peers_up(cluster, 1, {"node_002", "node_003"}),
        )
    finally:
        write_peers(nodes, 1, original)
        await reload(cluster, nodes, 1, "success")


def _annactl_reload(nodes: LiveCluster, *options: str) -> subprocess.CompletedProcess[str]:
    node_dir = nodes.layout.node_dir(1)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from anna_trio.cli.annactl import main; main()",
            "reload",
            "--pid-file",
            str(node_dir / "annad.pid"),
            "--audit-log",
            str(node_dir / "audit.jsonl"),
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_annactl_reload_confirms_through_the_node_when_told_which(
    nodes: LiveCluster,
) -> None:
    """With --node (and TLS files given as flags, no peers.yml) the result comes from the
    node's /rpc/status; the audit log is not read (here: a path that does not exist)."""
    node_dir = nodes.layout.node_dir(1)
    tls_options = [
        *("--peers", str(node_dir / "no-such-peers.yml")),
        *("--ca-cert", str(nodes.layout.directory / "ca" / "ca.pem")),
        *("--client-cert", str(node_dir / "tls" / "node_001.pem")),
        *("--client-key", str(node_dir / "tls" / "node_001.key")),
    ]
    url = f"https://127.0.0.1:{nodes.endpoint(1).rpc_port}"
    good = await trio.to_thread.run_sync(
        lambda: _annactl_reload(
            nodes, "--node", url, "--json", *tls_options, "--audit-log", "/nonexistent"
        )
    )
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["result"] == "success"
    original = peers_file(nodes, 1).read_text()
    try:
        write_peers(nodes, 1, _duplicate_id(read_peers(nodes, 1)))
        bad = await trio.to_thread.run_sync(
            lambda: _annactl_reload(nodes, "--node", url, *tls_options)
        )
    finally:
        write_peers(nodes, 1, original)
    assert bad.returncode == 1 and "duplicate node id" in bad.stderr, (bad.stdout, bad.stderr)


async def test_annactl_reload_reports_the_outcome(nodes: LiveCluster) -> None:
    """annactl reload exits 0 on a good reload and 1 naming the reason on a bad one."""
    good = await trio.to_thread.run_sync(_annactl_reload, nodes)
    assert good.returncode == 0, good.stderr
    assert "reload succeeded" in good.stdout
    original = peers_file(nodes, 1).read_text()
    try:
        write_peers(nodes, 1, _duplicate_id(read_peers(nodes, 1)))
        bad = await trio.to_thread.run_sync(_annactl_reload, nodes)
    finally:
        write_peers(nodes, 1, original)
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    assert "reload failed" in bad.stderr and "duplicate node id" in bad.stderr
    again = await trio.to_thread.run_sync(_annactl_reload, nodes)
    assert again.returncode == 0, again.stderr


async def test_sighup_burst_during_rounds(cluster: Cluster, nodes: LiveCluster) -> None:
    """20 SIGHUPs (alternating configs) mid-round: rounds complete, one link per peer remains."""
    original = peers_file(nodes, 1).read_text()
    failures_before = await metric(cluster, 1, "anna_peer_reload_total", result="failure")
    pinned = read_peers(nodes, 1)
    _peer(pinned, "node_003")["fingerprint"] = pki.fingerprint(
        nodes.layout.node_dir(3) / "tls" / "node_003.pem"
    )
    await _start_round(cluster, 1, "burst_a")
    try:
        for i in range(20):
            write_peers(nodes, 1, pinned if i % 2 == 0 else original)
            nodes.signal(1, signal.SIGHUP)
            if i == 10:
                await _start_round(cluster, 1, "burst_b")
            await trio.lowlevel.checkpoint()
    finally:
        write_peers(nodes, 1, original)
    await reload(cluster, nodes, 1, "success")
    for round_id in ("burst_a", "burst_b"):
        await round_everywhere(cluster, round_id, [1, 2, 3], ALL_THREE)
    await poll(
        "exactly one link per peer, each up",
        lambda: _peers_up(cluster, 1, {"node_002", "node_003"}),
    )
    samples = await metrics(cluster, 1)
    up_series = {
        dict(labels)["peer"]: v for (name, labels), v in samples.items() if name == "anna_peer_up"
    }
    assert up_series == {"node_002": 1.0, "node_003": 1.0}
    failures = await metric(cluster, 1, "anna_peer_reload_total", result="failure")
    assert failures == failures_before, "a reload read a half-written file?"
    await _start_round(cluster, 1, "after_burst")
    await round_everywhere(cluster, "after_burst", [1, 2, 3], ALL_THREE)


async def test_stopped_peer_backs_off_and_converges(cluster: Cluster, nodes: LiveCluster) -> None:
    """Node 3 frozen for 30 s: node 1 marks it down and backs off, rounds complete with
    nodes 1 and 2, and after resume node 3 is up again and agrees on those rounds."""

    async def failed_requests() -> float:
        samples = await metrics(cluster, 1)
        return sum(
            v
            for (name, labels), v in samples.items()
            if name == "anna_peer_request_total"
            and dict(labels)
            in ({"peer": "node_003", "status": "error"}, {"peer": "node_003", "status": "timeout"})
        )

    failed_before = await failed_requests()
    nodes.signal(3, signal.SIGSTOP)
    stopped_at = trio.current_time()
    try:

        async def node_3_down() -> bool:
            return await metric(cluster, 1, "anna_peer_up", peer="node_003") == 0

        await _start_round(cluster, 1, "outage_a")
        await _start_round(cluster, 2, "outage_b")
        await poll("node 1 to mark node_003 down", node_3_down)
        for round_id in ("outage_a", "outage_b"):
            await round_everywhere(cluster, round_id, [1, 2], {"node_001", "node_002"})

        async def backing_off() -> bool:
            return await failed_requests() >= failed_before + 2

        await poll("failed requests to node_003 counted", backing_off)
        assert trio.current_time() - stopped_at < OUTAGE, "the checks above took the whole outage"
        await trio.sleep_until(stopped_at + OUTAGE)  # the outage itself, not a wait for a result
        assert await metric(cluster, 1, "anna_peer_up", peer="node_003") == 0
    finally:
        nodes.signal(3, signal.SIGCONT)

    async def node_3_up() -> bool:
        return await metric(cluster, 1, "anna_peer_up", peer="node_003") == 1

    await poll("node 1 to see node_003 up again", node_3_up)
    code, _ = await cluster.rpc(3, "POST", "/rpc/reconcile", {})
    assert code == 200
    for round_id in ("outage_a", "outage_b"):
        views: list[Any] = []

        async def agreed(round_id: str = round_id) -> bool:
            nonlocal views
            views = [await cluster.round(n, round_id) for n in (1, 2, 3)]
            return all(v and v["status"] == "Complete" for v in views) and (
                len({v["result_digest"] for v in views}) == 1
            )

        await poll(f"node 3 to agree on {round_id}", agreed)


# --- clusters of their own ---------------------------------------------------------------


def _without_node_004(text: str) -> str:
    """The peers file minus the node_004 entry (testnet.init writes it last, 4 lines)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- node_id: node_004")
    return "\n".join(lines[:start] + lines[start + 4 :]) + "\n"


async def test_validator_added_then_removed_while_rounds_run(tmp_path: Path) -> None:
    """Adding node_004 by reload gives new rounds 4 validators and quorum 3; removing it
    again drops its link and its metric series."""
    four_node: dict[int, str] = {}

    def start_with_three(nodes: LiveCluster) -> None:
        for n in range(1, 5):
            four_node[n] = peers_file(nodes, n).read_text()
        for n in (1, 2, 3):
            write_peers(nodes, n, _without_node_004(four_node[n]))

    env = {"ANNA_ROUND_INTERVAL": "1"}
    with running(tmp_path / "testnet", 4, start=3, prepare=start_with_three, env=env) as nodes:
        await nodes.wait_ready()
        cluster = Cluster(nodes.layout)
        try:
            for n in (1, 2, 3):
                assert (await status(cluster, n))["validator_count"] == 3
            first = interval_round_id(time.time() + 1, 1)
            await round_everywhere(cluster, first, [1, 2, 3], ALL_THREE)

            for n in (1, 2, 3):
                write_peers(nodes, n, four_node[n])
            nodes.start(4, env=env)
            await nodes.wait_ready(4)
            for n in (1, 2, 3):
                answer = await reload(cluster, nodes, n, "success")
                assert (answer["validator_count"], answer["quorum"]) == (4, 3)
                entry = audit_entries(nodes, n, "peer_reload")[-1]
                assert (entry["added"], entry["removed"]) == (["node_004"], [])
            for n in (1, 2, 3, 4):
                assert await metric(cluster, n, "anna_validator_count") == 4
                assert await metric(cluster, n, "anna_quorum_size") == 3
            after = interval_round_id(time.time() + 1, 1)
            views = await round_everywhere(cluster, after, [1, 2, 3, 4], ALL_THREE | {"node_004"})
            assert {v["required_quorum"] for v in views} == {3}

            for n in (1, 2, 3):
                write_peers(nodes, n, _without_node_004(four_node[n]))
                answer = await reload(cluster, nodes, n, "success")
                assert (answer["validator_count"], answer["quorum"]) == (3, 2)
                assert {p["node_id"] for p in answer["peers"]} == ALL_THREE - {f"node_00{n}"}
                samples = await metrics(cluster, n)
                assert not [k for k in samples if dict(k[1]).get("peer") == "node_004"]
            later = interval_round_id(time.time() + 1, 1)
            views = await round_everywhere(cluster, later, [1, 2, 3], ALL_THREE)
            assert {v["required_quorum"] for v in views} == {2}
        finally:
            await cluster.aclose()


async def _served_certificate(nodes: LiveCluster, n: int) -> bytes:
    """The DER certificate a brand-new client connection to node n is shown."""
    seen: list[bytes] = []

    def capture(ssl_object: Any) -> None:
        seen.append(ssl_object.getpeercert(binary_form=True))

    directory = nodes.layout.directory
    cert = nodes.layout.node_dir(2) / "tls" / "node_002"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(directory / "ca" / "ca.pem"))
    context.load_cert_chain(str(cert.with_suffix(".pem")), str(cert.with_suffix(".key")))
    ep = nodes.layout.endpoints[n - 1]
    client = HttpClient(
        ep.host, ep.rpc_port, ssl_context=context, server_hostname=ep.host, verify_peer=capture
    )
    try:
        assert (await client.request("GET", "/health")).status == 200
    finally:
        await client.aclose()
    return seen[0]


async def test_certificate_rotation_applies_to_new_connections(tmp_path: Path) -> None:
    """A renewed node certificate is served and presented after SIGHUP: new clients see
    it, and peers still accept node 1 once its old certificate is revoked."""
    with running(tmp_path / "testnet") as nodes:
        await nodes.wait_ready()
        cluster = Cluster(nodes.layout)
        try:
            node1_cert = nodes.layout.node_dir(1) / "tls" / "node_001.pem"
            old_copy = tmp_path / "node_001.old.pem"
            shutil.copy(node1_cert, old_copy)
            ca_dir = nodes.layout.directory / "ca"
            pki.issue_cert(
                ca_dir,
                node_id="node_001",
                sans=["localhost", "127.0.0.1", "anna-node-1"],
                out_dir=node1_cert.parent,
            )
            assert pki.fingerprint(node1_cert) != pki.fingerprint(old_copy)
            await reload(cluster, nodes, 1, "success")
            served = await _served_certificate(nodes, 1)
            assert pki.fingerprint_der(served) == pki.fingerprint(node1_cert)
            await _start_round(cluster, 1, "after_rotation")
            await round_everywhere(cluster, "after_rotation", [1, 2, 3], ALL_THREE)

            # Retire the old certificate: peers load the CRL and node 2 dies and restarts, so node 1
            # must open new connections to it, which only succeed with its renewed one.
            assert pki.revoke(ca_dir, old_copy)
            for n in (2, 3):
                await reload(cluster, nodes, n, "success")
            assert nodes.kill(2) == -signal.SIGKILL
            await cluster.aclose()
            cluster = Cluster(nodes.layout)  # its client certificate is node 1's: renewed too
            nodes.start(2)
            await nodes.wait_ready(2)
            reached = await metric(
                cluster, 1, "anna_peer_request_total", peer="node_002", status="success"
            )

            async def new_connections_accepted() -> bool:
                return (
                    await metric(
                        cluster, 1, "anna_peer_request_total", peer="node_002", status="success"
                    )
                    >= reached + 2
                )

            await poll(
                "node 1's requests to the restarted node 2 to succeed", new_connections_accepted
            )
            revoked = await metric(
                cluster,
                2,
                "anna_tls_handshake_failures_total",
                side="server",
                reason="certificate_revoked",
            )
            assert revoked == 0, "node 1 presented its revoked certificate to node 2"
            await _start_round(cluster, 2, "after_revocation")
            await round_everywhere(cluster, "after_revocation", [1, 2, 3], ALL_THREE)
        finally:
            await cluster.aclose()
