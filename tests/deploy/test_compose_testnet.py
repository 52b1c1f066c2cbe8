"""The compose testnet for real: the README's no-registry commands, verbatim, in the
checkout on a dockerd of this suite's own — base image from Debian packages, wheels built
here, `docker build --network none`, `docker-compose up`, run_rounds.sh, `down` — then
the good-citizen checks: healthy on /ready, annad as anna, metrics on 9001-9003 for the
right node, SIGTERM ends each node with exit 0 and `daemon_stop`, and a second `up` has
the rounds. Nothing patches docker-compose.yml or the Dockerfile: what runs is what a
user runs.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from engine import docker_engine
from runbook import section_blocks

from anna_trio import testnet
from conftest import ROOT, host_env, require_tools, sh

NODES = (1, 2, 3)
PORTS = (8001, 8002, 8003, 9001, 9002, 9003)
COMPOSE_DIR = ROOT / "artifacts" / "compose-testnet"
HEALTHY_TIMEOUT = 60.0
ANNA_UID = 10001


@attrs.frozen
class Run:
    """Commands run in the checkout, and the engine's clock around them."""

    output: str
    since: float
    until: float


def run_in_checkout(script: str) -> Run:
    since = time.time()
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=ROOT,
        env=host_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
        check=False,
    )
    until = time.time() + 1
    assert done.returncode == 0, f"exit {done.returncode}:\n{done.stdout}"
    return Run(done.stdout, since, until)


def node_exits(run: Run) -> dict[str, int]:
    """Exit code of every compose container that ended during `run`, by service name."""
    events = sh(
        f"docker events --since {run.since:.3f} --until {run.until:.3f}"
        " --filter type=container --filter event=die --format '{{json .Actor.Attributes}}'"
    ).stdout
    exits = {}
    for line in events.splitlines():
        attributes = json.loads(line)
        if attributes.get("com.docker.compose.project.working_dir") == str(ROOT):
            exits[attributes["com.docker.compose.service"]] = int(attributes["exitCode"])
    return exits


def assert_stopped_cleanly(run: Run) -> None:
    """SIGTERM, not the SIGKILL after the grace period: exit 0, daemon_stop last, no pid file."""
    nodes = {service: code for service, code in node_exits(run).items() if service != "init"}
    assert nodes == {f"anna-node-{n}": 0 for n in NODES}
    for n in NODES:
        last = json.loads((COMPOSE_DIR / f"node{n}" / "audit.jsonl").read_text().splitlines()[-1])
        assert last["event"] == "daemon_stop", f"node {n}: {last}"
        assert not (COMPOSE_DIR / f"node{n}" / "annad.pid").exists()


def build_info_node(metrics: str) -> str | None:
    """The node_id label of anna_build_info in a /metrics page."""
    match = re.search(r'^anna_build_info\{[^}]*node_id="([^"]+)"', metrics, re.MULTILINE)
    return match.group(1) if match else None


def containers() -> dict[int, dict[str, Any]]:
    """`docker inspect` of the running node containers, by node number."""
    ids = {n: sh(f"docker-compose ps -q anna-node-{n}").stdout.strip() for n in NODES}
    assert all(ids.values()), f"not every node is running: {ids}"
    return {n: inspect(container_id) for n, container_id in ids.items()}


def inspect(container_id: str) -> dict[str, Any]:
    inspected: list[dict[str, Any]] = json.loads(sh(f"docker inspect {container_id}").stdout)
    return inspected[0]


async def rounds_everywhere(round_ids: list[str]) -> dict[tuple[int, str], Any]:
    """Every node's view of those rounds, asked over mTLS as run_rounds.sh asks."""
    cluster = testnet.Cluster(testnet.Layout.load(COMPOSE_DIR))
    try:
        return {(n, r): await cluster.round(n, r) for n in NODES for r in round_ids}
    finally:
        await cluster.aclose()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    require_tools("dockerd", "docker", "docker-compose", "mmdebstrap", "iptables", "ip")
    with docker_engine(tmp_path_factory.mktemp("dockerd") / "dockerd.log"):
        yield


@pytest.fixture(scope="module")
def readme_run(engine: None) -> Iterator[Run]:
    """The README's no-registry block, run once from a clean compose testnet."""
    busy = []
    for port in PORTS:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    if busy:
        pytest.fail(f"the compose testnet's ports are in use: {busy}")
    sh("docker-compose down --remove-orphans")  # leftovers of an interrupted run
    shutil.rmtree(COMPOSE_DIR, ignore_errors=True)
    (block,) = section_blocks(ROOT / "README.md", "Without a registry")
    for command in ("docker build --network none", "docker-compose up -d", "docker-compose down"):
        assert command in block.script, f"{block}: the block lost `{command}`"
    try:
        yield run_in_checkout(block.script)
    finally:
        sh("docker-compose down", check=False)


def test_readme_commands_run_the_three_scenarios(readme_run: Run) -> None:
    """The commands succeed and run_rounds.sh passes all three scenarios."""
    assert "3 passed, 0 failed" in readme_run.output, readme_run.output


def test_scenarios_wrote_the_artifacts(readme_run: Run) -> None:
    """summary.json, every node's status per round, and every node's metrics, fetched
    on 9001-9003 from the right node."""
    summary = json.loads((COMPOSE_DIR / "summary.json").read_text())
    assert summary["passed"] is True
    assert [s["passed"] for s in summary["scenarios"]] == [True, True, True]
    for n in NODES:
        for r in (1, 2, 3):
            status = json.loads((COMPOSE_DIR / f"round_{r}" / f"node_{n}.json").read_text())
            assert status["node_id"] == f"node_00{n}"
        metrics = (COMPOSE_DIR / f"node_{n}_metrics.txt").read_text()
        assert build_info_node(metrics) == f"node_00{n}"
        assert "anna_byzantine_nodes_total 1.0" in metrics.splitlines()


def test_down_stops_every_node_cleanly(readme_run: Run) -> None:
    """`docker-compose down` (SIGTERM) ends each node with exit 0 and daemon_stop."""
    assert_stopped_cleanly(readme_run)


@pytest.fixture(scope="module")
def second_up(readme_run: Run) -> Iterator[dict[int, dict[str, Any]]]:
    """`docker-compose up -d` again on the same folder, until every node is healthy."""
    run_in_checkout("docker-compose up -d")
    states = containers()
    deadline = time.monotonic() + HEALTHY_TIMEOUT
    while True:
        states = {n: inspect(state["Id"]) for n, state in states.items()}
        health = {n: state["State"].get("Health", {}).get("Status") for n, state in states.items()}
        if set(health.values()) == {"healthy"}:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"not healthy after {HEALTHY_TIMEOUT:.0f} s: {health}")
        time.sleep(0.5)
    try:
        yield states
    finally:
        sh("docker-compose down", check=False)


def test_health_is_ready_on_the_metrics_port(second_up: dict[int, dict[str, Any]]) -> None:
    """The image's healthcheck asks /ready; every node reported healthy."""
    for state in second_up.values():
        assert "http://127.0.0.1:9090/ready" in " ".join(state["Config"]["Healthcheck"]["Test"])


def test_annad_runs_as_the_anna_user(second_up: dict[int, dict[str, Any]]) -> None:
    """PID 1 of every node container is annad with uid 10001, not root."""
    for state in second_up.values():
        assert state["Config"]["User"] == "anna"
        status = Path(f"/proc/{state['State']['Pid']}/status").read_text()
        uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
        assert set(map(int, uids)) == {ANNA_UID}
        assert Path(f"/proc/{state['State']['Pid']}/cmdline").read_bytes().count(b"annad") == 1


def test_metrics_ports_answer_for_their_node(second_up: dict[int, dict[str, Any]]) -> None:
    """Host ports 9001-9003 reach the metrics listeners of nodes 1-3."""
    for n in NODES:
        with urllib.request.urlopen(f"http://127.0.0.1:900{n}/metrics", timeout=10) as answer:
            assert build_info_node(answer.read().decode()) == f"node_00{n}"


def test_state_survives_down_and_up(second_up: dict[int, dict[str, Any]]) -> None:
    """Every scenario round is still Complete on every node after down and up."""
    scenarios = json.loads((COMPOSE_DIR / "summary.json").read_text())["scenarios"]
    views = trio.run(rounds_everywhere, [scenario["round_id"] for scenario in scenarios])
    for scenario in scenarios:
        for n in NODES:
            view = views[n, scenario["round_id"]]
            assert view is not None and view["status"] == "Complete", (n, scenario["round_id"])
            assert view["consensus_tis"] == scenario["consensus_tis"][f"node_00{n}"]


def test_second_down_stops_every_node_cleanly(second_up: dict[int, dict[str, Any]]) -> None:
    """Down again: exit 0 and daemon_stop, as the first time."""
    assert_stopped_cleanly(run_in_checkout("docker-compose down"))
