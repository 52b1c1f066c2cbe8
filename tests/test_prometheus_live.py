"""A real Prometheus, loaded with conf/prometheus.yml and conf/alerts.yml, scraping
anna metrics and answering the seed dashboard's PromQL.

The targets are three exposition endpoints serving what `anna_trio.metrics.Metrics`
renders, so this checks names, labels and types end to end without a cluster. The
`Prometheus` helper takes any targets: a testnet test passes 127.0.0.1:9001-9003.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from ruamel.yaml import YAML

from anna_trio.metrics import Metrics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
NODE_IDS = ("node_001", "node_002", "node_003")
PEER_SUCCESS_RATE = (
    'sum by (peer)(rate(anna_peer_request_total{status="success"}[5m]))'
    " / sum by (peer)(rate(anna_peer_request_total[5m]))"
)


def wait_until(what: str, check: Callable[[], Any], *, within: float = 30.0) -> Any:
    """Poll an external process until `check()` returns something truthy."""
    deadline = time.monotonic() + within
    while True:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ExpositionServer:
    """Serves one node's rendered metrics at /metrics from a file it rewrites."""

    def __init__(self, directory: Path, node_id: str) -> None:
        self.directory = directory
        self.metrics = Metrics(node_id)
        self.publish()
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1"),
                *("--directory", str(directory), "0"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        banner = self.process.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...)"
        self.process.stdout.close()
        self.address = f"127.0.0.1:{banner.split(' port ')[1].split()[0]}"

    def publish(self) -> None:
        staging = self.directory / "metrics.tmp"
        staging.write_bytes(self.metrics.render())
        os.replace(staging, self.directory / "metrics")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def exposition_servers(tmp_path: Path) -> Iterator[dict[str, ExpositionServer]]:
    servers: dict[str, ExpositionServer] = {}
    try:
        for node_id in NODE_IDS:
            directory = tmp_path / node_id
            directory.mkdir()
            servers[node_id] = ExpositionServer(directory, node_id)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


class Prometheus:
    """A Prometheus process using the repository's config with other targets."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed (CI installs it in .ci/run)")
        yaml = YAML()
        config = yaml.load((ROOT / "conf" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "1s"
        config["global"]["evaluation_interval"] = "1s"
        (job,) = config["scrape_configs"]
        job["static_configs"] = [
            {"targets": [address], "labels": {"node": node_id}}
            for node_id, address in targets.items()
        ]
        with (workdir / "prometheus.yml").open("w") as out:
            yaml.dump(config, out)
        shutil.copy(ROOT / "conf" / "alerts.yml", workdir / "alerts.yml")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=5)
        wait_until("Prometheus ready", lambda: self.client.get("/-/ready").is_success)

    def query(self, expr: str) -> dict[str, float]:
        """Instant query: value by `node` label (or `peer` for per-peer expressions)."""
        answer = self.client.get("/api/v1/query", params={"query": expr}).json()
        assert answer["status"] == "success", answer
        return {
            sample["metric"].get("node") or sample["metric"].get("peer", ""): float(
                sample["value"][1]
            )
            for sample in answer["data"]["result"]
        }

    def targets_up(self) -> bool:
        active = self.client.get("/api/v1/targets").json()["data"]["activeTargets"]
        return len(active) == len(NODE_IDS) and all(t["health"] == "up" for t in active)

    def stop(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture
def prometheus_for() -> Iterator[Callable[[Path, dict[str, str]], Prometheus]]:
    started: list[Prometheus] = []

    def start(workdir: Path, targets: dict[str, str]) -> Prometheus:
        started.append(Prometheus(workdir, targets))
        return started[-1]

    yield start
    for prometheus in started:
        prometheus.stop()


def start_peer_tasks(servers: dict[str, ExpositionServer]) -> None:
    """Each node's peer tasks exist, with no request answered yet."""
    for node_id, server in servers.items():
        for peer in NODE_IDS:
            if peer != node_id:
                server.metrics.peer_up.labels(peer).set(0)
                for status in ("success", "error"):
                    server.metrics.peer_requests.labels(peer, status)
        server.publish()


def simulate_three_rounds(servers: dict[str, ExpositionServer]) -> None:
    """Every node completes three rounds at TIS 0.85, flags one node, and talks to peers."""
    for node_id, server in servers.items():
        metrics = server.metrics
        metrics.consensus_rounds.inc(3)
        metrics.average_tis.set(0.85)
        metrics.byzantine_nodes.set(1)
        metrics.quorum_size.set(2)
        metrics.validator_count.set(3)
        for peer in NODE_IDS:
            if peer != node_id:
                metrics.peer_up.labels(peer).set(1)
                metrics.peer_requests.labels(peer, "success").inc(2)
                metrics.peer_requests.labels(peer, "error").inc(1)
                metrics.round_duration.observe(0.2)
        server.publish()


def test_prometheus_evaluates_seed_queries_and_alerts_on_anna_metrics(
    tmp_path: Path,
    exposition_servers: dict[str, ExpositionServer],
    prometheus_for: Callable[[Path, dict[str, str]], Prometheus],
) -> None:
    """Scraped anna metrics answer the dashboard's seed PromQL; every alert evaluates."""
    targets = {node_id: server.address for node_id, server in exposition_servers.items()}
    start_peer_tasks(exposition_servers)
    prometheus = prometheus_for(tmp_path, targets)
    wait_until("all targets up", prometheus.targets_up)
    simulate_three_rounds(exposition_servers)
    wait_until(
        "the rounds to be scraped",
        lambda: prometheus.query("anna_consensus_rounds_total == 3").keys() == set(NODE_IDS),
    )

    rounds_rate = prometheus.query("rate(anna_consensus_rounds_total[5m])")
    assert rounds_rate.keys() == set(NODE_IDS)
    assert all(rate > 0 for rate in rounds_rate.values())
    assert prometheus.query("anna_average_tis") == dict.fromkeys(NODE_IDS, 0.85)
    assert prometheus.query("anna_byzantine_nodes_total") == dict.fromkeys(NODE_IDS, 1.0)
    success = wait_until(
        "two samples of every peer's requests",
        lambda: (rates := prometheus.query(PEER_SUCCESS_RATE)).keys() == set(NODE_IDS) and rates,
    )
    assert all(rate == pytest.approx(2 / 3) for rate in success.values())

    def rules_evaluated() -> list[dict[str, Any]] | None:
        groups = prometheus.client.get("/api/v1/rules").json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        done = all(not rule["lastEvaluation"].startswith("0001") for rule in rules)
        return rules if rules and done else None

    rules = wait_until("alert rules evaluated", rules_evaluated)
    assert {rule["name"] for rule in rules} >= {"AnnaByzantineNodeDetected", "AnnaTISDrift"}
    assert [rule["name"] for rule in rules if rule["health"] != "ok"] == []
    wait_until(
        "the Byzantine alert on every node",
        lambda: (
            {
                alert["labels"]["node"]
                for alert in prometheus.client.get("/api/v1/alerts").json()["data"]["alerts"]
                if alert["labels"]["alertname"] == "AnnaByzantineNodeDetected"
            }
            == set(NODE_IDS)
        ),
    )


@pytest.mark.integration
def test_prometheus_scrapes_a_running_testnet(
    tmp_path: Path,
    cluster_factory: Callable[..., Any],
    prometheus_for: Callable[[Path, dict[str, str]], Prometheus],
) -> None:
    """A real Prometheus scrapes a live 3-node mTLS cluster and the seed's PromQL answers."""
    cluster = cluster_factory()
    targets = {ep.node_id: f"{ep.host}:{ep.metrics_port}" for ep in cluster.layout.endpoints}
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    prometheus = prometheus_for(workdir, targets)
    wait_until("all targets up", prometheus.targets_up)

    async def three_rounds() -> None:
        async with cluster.connect() as client:
            for i in range(3):
                status, body = await client.rpc(
                    1, "POST", "/rpc/round/start", {"round_id": f"prom_{i}"}
                )
                assert status == 202, body

    trio.run(three_rounds)
    wait_until(
        "three completed rounds scraped from every node",
        lambda: prometheus.query("anna_consensus_rounds_total >= 3").keys() == set(NODE_IDS),
    )
    rates = wait_until(
        "a positive round rate on every node",
        lambda: (
            (r := prometheus.query("rate(anna_consensus_rounds_total[5m]) > 0")).keys()
            == set(NODE_IDS)
            and r
        ),
    )
    assert all(rate > 0 for rate in rates.values())
    assert all(0.8 <= tis <= 0.9 for tis in prometheus.query("anna_average_tis").values())
    assert prometheus.query("anna_byzantine_nodes_total") == dict.fromkeys(NODE_IDS, 0.0)
    assert prometheus.query("anna_quorum_size") == dict.fromkeys(NODE_IDS, 2.0)
    success = wait_until(
        "every peer's success rate",
        lambda: (s := prometheus.query(PEER_SUCCESS_RATE)).keys() == set(NODE_IDS) and s,
    )
    assert all(rate == pytest.approx(1.0) for rate in success.values())
