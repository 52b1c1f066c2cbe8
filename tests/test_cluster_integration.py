"""Real annad processes (issue 2, "The consensus node"): rounds over mTLS, kill -9 and
rejoin, health and metrics, daemon exit codes, and annactl against a live cluster.

Clusters listen on free loopback ports; `annactl testnet run` uses SPEC §10's fixed
ports 8001-8003/9001-9003.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from _launch import LiveCluster
from anna_trio import testnet
from anna_trio.sim import signed_observation
from conftest import console_script

pytestmark = pytest.mark.integration

ALL_THREE = {"node_001", "node_002", "node_003"}
INSECURE_WARNING = "WARN: Running with allow_insecure_peers=true - TLS DISABLED"
PROCESS_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def cluster(module_cluster_factory: Callable[..., LiveCluster]) -> LiveCluster:
    """Three nodes with mTLS, shared by the tests of this module that leave it healthy."""
    return module_cluster_factory(nodes=3)


async def start_round(client: testnet.Cluster, n: int, round_id: str) -> None:
    status, body = await client.rpc(n, "POST", "/rpc/round/start", {"round_id": round_id})
    assert (status, body.get("round_id")) == (202, round_id), body


async def complete_everywhere(
    client: testnet.Cluster,
    round_id: str,
    participants: set[str] = ALL_THREE,
    nodes: tuple[int, ...] = (1, 2, 3),
) -> dict[int, dict[str, Any]]:
    """Poll until `round_id` is Complete on `nodes` with exactly `participants`
    (bounded by the polling client's SCENARIO_TIMEOUT)."""
    views: dict[int, dict[str, Any]] = {}

    async def check() -> bool:
        for n in nodes:
            view = await client.round(n, round_id)
            if (
                view is None
                or view["status"] != "Complete"
                or set(view["participating_nodes"]) != participants
            ):
                return False
            views[n] = view
        return True

    await client.wait_for(f"{round_id} Complete with {sorted(participants)}", check)
    return views


def observation_of(view: dict[str, Any], node_id: str) -> dict[str, Any]:
    [obs] = [o for o in view["observations"] if o["node_id"] == node_id]
    return dict(obs)


async def byzantine_everywhere(client: testnet.Cluster, nodes: tuple[int, ...]) -> set[str]:
    found: set[str] = set()
    for n in nodes:
        found |= await client.byzantine_ids(n)
    return found


async def run(*command: str) -> tuple[int, str, str]:
    """Run a command to completion (bounded by PROCESS_TIMEOUT): (exit code, stdout, stderr)."""
    with trio.fail_after(PROCESS_TIMEOUT):
        done = await trio.run_process(
            list(command), capture_stdout=True, capture_stderr=True, check=False
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


# --- rounds ------------------------------------------------------------------------------


async def test_ten_consecutive_rounds_complete_with_zero_drift(cluster: LiveCluster) -> None:
    """Ten rounds started on rotating nodes complete everywhere with identical results."""
    async with cluster.connect() as client:
        for i in range(10):
            round_id = f"drift_{i:02d}"
            await start_round(client, i % 3 + 1, round_id)
            views = await complete_everywhere(client, round_id)
            assert len({v["consensus_tis"] for v in views.values()}) == 1, views
            assert len({v["result_digest"] for v in views.values()}) == 1, views
            signatures = {tuple(o["signature"] for o in v["observations"]) for v in views.values()}
            assert len(signatures) == 1
            view = views[1]
            assert view["total_observations"] == 3
            assert view["consensus_tis"] == statistics.median(
                o["tis_overall"] for o in view["observations"]
            )
        for n in (1, 2, 3):
            _, status = await client.rpc(n, "GET", "/rpc/status")
            listed = {r["round_id"]: r for r in status["rounds"]}
            assert all(listed[f"drift_{i:02d}"]["status"] == "Complete" for i in range(10))
            assert status["byzantine_nodes"] == []


RELAY_ROUND_TIMEOUT = 6.0


@pytest.fixture
def relay_cluster(cluster_factory: Callable[..., LiveCluster]) -> LiveCluster:
    """Five nodes: above three validators observations are relayed by a round's starter."""
    return cluster_factory(nodes=5, round_timeout=RELAY_ROUND_TIMEOUT)


async def test_five_nodes_relay_through_the_starter_and_survive_its_kill9(
    relay_cluster: LiveCluster,
) -> None:
    """Five nodes (gossip relayed by each round's starter): rounds started on every node
    complete everywhere with identical results; then the starter is killed -9 as soon
    as its start reached the others (often before it relayed their answers), and the
    four still complete that round with all five observations before its timeout
    (anti-entropy, and the early pull of a round still Pending, repair a lost relay)."""
    cluster = relay_cluster
    everyone = {f"node_{n:03d}" for n in range(1, 6)}
    async with cluster.connect() as client:
        for i in range(10):
            round_id = f"relay_{i:02d}"
            await start_round(client, i % 5 + 1, round_id)
            views = await complete_everywhere(client, round_id, everyone, (1, 2, 3, 4, 5))
            assert len({v["result_digest"] for v in views.values()}) == 1, views
        started = trio.current_time()
        await start_round(client, 1, "relay_starter_killed")

        async def pushed_to_all() -> bool:
            return all([await client.round(n, "relay_starter_killed") for n in (2, 3, 4, 5)])

        await client.wait_for("the start to reach nodes 2-5", pushed_to_all)
        assert cluster.kill(1) == -signal.SIGKILL
        await complete_everywhere(client, "relay_starter_killed", everyone, (2, 3, 4, 5))
        assert trio.current_time() - started < RELAY_ROUND_TIMEOUT
        assert await byzantine_everywhere(client, (2, 3, 4, 5)) == set()


@pytest.fixture
def crash_cluster(cluster_factory: Callable[..., LiveCluster]) -> LiveCluster:
    """Nodes 1-3 of a four-validator cluster; node_004 never runs, so its key can sign
    crafted observations that conflict with nothing (quorum 3: a round needs node 2)."""
    return cluster_factory(nodes=4, running=(1, 2, 3), round_timeout=1.0)


async def test_kill9_node_rejoins_keeps_acknowledged_data_and_never_resigns(
    crash_cluster: LiveCluster,
) -> None:
    """After kill -9 mid-round node 2 restarts with what it acknowledged and its own
    signatures unchanged, finishes the interrupted round and keeps participating."""
    cluster = crash_cluster
    outsider_key = cluster.layout.node_dir(4) / "keys" / "node_id.sec"
    async with cluster.connect() as client:
        await start_round(client, 1, "crash_a")
        signed_before = observation_of(
            (await complete_everywhere(client, "crash_a", nodes=(2,)))[2], "node_002"
        )
        await start_round(client, 2, "crash_c")
        crafted = signed_observation(outsider_key, "node_004", "crash_b", tis=0.42, audit_id=10**12)
        status, body = await client.rpc(2, "POST", "/rpc/submit", {"observation": crafted})
        assert (status, body["duplicate"]) == (200, False), body
        assert cluster.kill(2) == -signal.SIGKILL
        seen_by_node_1 = await client.round(1, "crash_c")
        sent_before_kill = [
            o
            for o in (seen_by_node_1 or {"observations": []})["observations"]
            if o["node_id"] == "node_002"
        ]
        cluster.start(2)
        await cluster.wait_ready(2)
    async with cluster.connect() as client:
        crash_b = await client.round(2, "crash_b")
        assert crash_b is not None, "node 2 forgot a round it acknowledged an observation for"
        assert observation_of(crash_b, "node_004") == crafted
        crash_a = await client.round(2, "crash_a")
        assert crash_a is not None
        assert observation_of(crash_a, "node_002") == signed_before

        views = await complete_everywhere(client, "crash_c")
        resent = [observation_of(v, "node_002") for v in views.values()]
        assert all(obs == resent[0] for obs in resent)
        assert sent_before_kill in ([], resent[:1]), "node 2 signed crash_c twice"
        for n, round_id in ((2, "crash_d"), (3, "crash_e")):
            await start_round(client, n, round_id)
            await complete_everywhere(client, round_id)
        assert await byzantine_everywhere(client, (1, 2, 3)) == set()

        own_ids = [
            observation_of(view, "node_002")["audit_id"]
            for view in [await client.round(2, r) for r in ("crash_a", "crash_c", "crash_e")]
            if view is not None
        ]
    audit_ids = [
        json.loads(line)["audit_id"]
        for line in (cluster.layout.node_dir(2) / "audit.jsonl").read_text().splitlines()
    ]
    assert audit_ids == sorted(set(audit_ids)), "audit ids repeat or go back after kill -9"
    assert own_ids == sorted(own_ids) and len(own_ids) == 3
    assert not set(own_ids) & set(audit_ids), "an audit_id was used twice"


# --- health and metrics ----------------------------------------------------------------

SEED_METRICS = {
    "anna_consensus_rounds_total": ("counter", set()),
    "anna_byzantine_nodes_total": ("gauge", set()),
    "anna_quorum_size": ("gauge", set()),
    "anna_average_tis": ("gauge", set()),
    "anna_peer_request_total": ("counter", {"peer", "status"}),
    "anna_peer_reload_total": ("counter", {"result"}),
    "anna_migration_events_total": ("counter", {"result"}),
}


async def test_health_ready_and_seed_metrics(cluster: LiveCluster) -> None:
    """/health on both listeners, /ready, and the seed's seven metrics with exact labels."""
    async with cluster.connect() as client:
        await start_round(client, 3, "metrics_round")
        await complete_everywhere(client, "metrics_round")
        for n in (1, 2, 3):
            status, health = await client.rpc(n, "GET", "/health")
            assert status == 200
            assert health["status"] == "ok" and health["node_id"] == testnet.node_id(n)
            assert isinstance(health["version"], str) and health["version"]
            status, raw = await client.plain(n, "GET", "/health")
            assert (status, json.loads(raw)) == (200, health)
            status, raw = await client.plain(n, "GET", "/ready")
            assert status == 200, raw

            status, raw = await client.plain(n, "GET", "/metrics")
            assert status == 200
            text = raw.decode()
            assert "_created" not in text
            types: dict[str, str] = {}
            labels: dict[str, set[frozenset[str]]] = {}
            values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    types[sample.name] = family.type
                    labels.setdefault(sample.name, set()).add(frozenset(sample.labels))
                    values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
            for name, (kind, label_names) in SEED_METRICS.items():
                assert f"# TYPE {name} {kind}" in text or types.get(name) == kind, name
                assert labels.get(name) == {frozenset(label_names)}, (name, labels.get(name))
            assert values["anna_consensus_rounds_total", ()] >= 1
            assert 0.0 <= values["anna_average_tis", ()] <= 1.0
            assert values["anna_quorum_size", ()] == 2
            assert values["anna_byzantine_nodes_total", ()] == 0
            peers = {dict(k)["peer"] for name, k in values if name == "anna_peer_request_total"}
            assert peers == ALL_THREE - {testnet.node_id(n)}
            reloads = {dict(k)["result"] for name, k in values if name == "anna_peer_reload_total"}
            assert reloads == {"success", "failure"}
            migrations = {
                dict(k)["result"] for name, k in values if name == "anna_migration_events_total"
            }
            assert migrations == {"success", "rollback", "failure"}


# --- annactl against the running cluster ------------------------------------------------


async def test_annactl_status_round_and_reconcile(cluster: LiveCluster) -> None:
    """annactl status, round start/show and reconcile work against a live mTLS node."""
    ep = cluster.endpoint(1)
    target = (
        "--node",
        f"https://127.0.0.1:{ep.rpc_port}",
        "--peers",
        str(cluster.layout.node_dir(1) / "peers.yml"),
    )
    annactl = console_script("annactl")

    code, out, err = await run(annactl, "round", "start", "--round-id", "ctl_round", *target)
    assert (code, out.strip()) == (0, "ctl_round"), err
    async with cluster.connect() as client:
        await complete_everywhere(client, "ctl_round")

    code, out, err = await run(annactl, "round", "show", "ctl_round", "--json", *target)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["status"] == "Complete" and set(shown["participating_nodes"]) == ALL_THREE

    code, out, err = await run(annactl, "status", *target)
    assert code == 0, err
    assert "node node_001: 3 validators, quorum 2" in out
    assert re.search(r"^ctl_round\s+Complete\s+3\s+0\.\d{6}$", out, re.M), out
    assert "byzantine: none" in out
    assert re.search(r"^peer node_002\s+up\s", out, re.M) and re.search(
        r"^peer node_003\s+up\s", out, re.M
    ), out

    code, out, err = await run(annactl, "status", "--json", *target)
    assert code == 0, err
    known = [r["round_id"] for r in json.loads(out)["rounds"]]
    code, out, err = await run(annactl, "round", "start", *target)
    assert code == 0, err
    fresh = out.strip()
    assert fresh > max(known), (fresh, known)

    code, out, err = await run(annactl, "reconcile", *target)
    assert code == 0, err
    assert re.fullmatch(r"Reconciled \d+ pending rounds\n", out), out

    code, out, err = await run(annactl, "round", "show", "no_such_round", *target)
    assert code == 1 and out == ""
    assert "404" in err and len(err.strip().splitlines()) == 1, err


# --- annad exit codes ------------------------------------------------------------------


async def test_second_annad_on_same_state_dir_exits_78(cluster: LiveCluster) -> None:
    """A second annad on a locked state dir exits 78 naming the lock; the first runs on."""
    pid_file = cluster.layout.node_dir(1) / "annad.pid"
    pid_before = pid_file.read_text()
    code, out, err = await run(*testnet.annad_command(cluster.layout, cluster.endpoint(1)))
    assert code == 78, (out, err)
    assert "lock" in err.lower(), err
    assert pid_file.read_text() == pid_before
    async with cluster.connect() as client:
        assert (await client.rpc(1, "GET", "/health"))[0] == 200


async def test_secret_key_readable_by_others_exits_78(tmp_path: Path) -> None:
    """annad refuses a node key with mode 0644: exit 78 and a line naming the file."""
    layout = testnet.free_layout(tmp_path / "tn", 1, tls=False)
    testnet.init(layout)
    secret = layout.node_dir(1) / "keys" / "node_id.sec"
    secret.chmod(0o644)
    code, _, err = await run(*testnet.annad_command(layout, layout.endpoints[0]))
    assert code == 78, err
    assert str(secret) in err and "0644" in err, err
    assert not (layout.node_dir(1) / "annad.pid").exists()


def test_insecure_peers_warn_and_sigterm_exits_clean(
    cluster_factory: Callable[..., LiveCluster],
) -> None:
    """Plain HTTP logs the exact insecure warning; SIGTERM exits 0, removes the pid file
    and closes the audit log with daemon_stop."""
    single = cluster_factory(nodes=1, tls=False)
    node_dir = single.layout.node_dir(1)
    assert (node_dir / "annad.pid").exists()
    assert single.stop_all() == {1: 0}
    assert INSECURE_WARNING in (node_dir / "annad.log").read_text()
    assert not (node_dir / "annad.pid").exists()
    events = [
        json.loads(line)["event"] for line in (node_dir / "audit.jsonl").read_text().splitlines()
    ]
    assert events[0] == "daemon_start" and events[-1] == "daemon_stop", events


def test_sigterm_with_idle_keepalive_client_exits_promptly(
    cluster_factory: Callable[..., LiveCluster],
) -> None:
    """SIGTERM with only an idle keep-alive client connected exits well within the grace."""
    single = cluster_factory(nodes=1, tls=False)
    ep = single.endpoint(1)
    with socket.create_connection((ep.host, ep.rpc_port)) as idle:
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: anna\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        codes = single.stop_all()
        elapsed = time.monotonic() - started
    assert codes == {1: 0}
    assert elapsed < 2.0, f"SIGTERM took {elapsed:.1f} s with one idle client"


async def test_annad_help_and_usage_error() -> None:
    """annad --help exits 0 with usage; an unknown flag exits 64 with one error line."""
    annad = console_script("annad")
    code, out, _ = await run(annad, "--help")
    assert code == 0 and out.startswith("usage: annad")
    code, out, err = await run(annad, "--no-such-flag")
    assert code == 64 and out == ""
    assert "--no-such-flag" in err and err.strip().splitlines()[-1].startswith("annad: error:")


# --- the local testnet ----------------------------------------------------------------


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_annactl_testnet_run_passes_and_writes_artifacts(tmp_path: Path) -> None:
    """`annactl testnet run` passes all three scenarios and writes SPEC §10's artifacts."""
    busy = [p for p in (8001, 8002, 8003, 9001, 9002, 9003) if _port_in_use(p)]
    if busy:
        message = f"testnet ports in use: {busy}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI has the machine to itself: busy ports are a leak
        pytest.skip(message)
    directory = tmp_path / "testnet"
    code, out, err = await run(console_script("annactl"), "testnet", "run", "--dir", str(directory))
    assert code == 0, out + err
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["passed"] is True, summary
    for number in (1, 2, 3):
        for n in (1, 2, 3):
            status = json.loads((directory / f"round_{number}" / f"node_{n}.json").read_text())
            assert status["node_id"] == testnet.node_id(n)
    for n in (1, 2, 3):
        assert "anna_consensus_rounds_total" in (directory / f"node_{n}_metrics.txt").read_text()
    assert not any((directory / f"node{n}" / "annad.pid").exists() for n in (1, 2, 3))
