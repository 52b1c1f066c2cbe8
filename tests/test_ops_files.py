"""Operations files: the systemd unit, Prometheus config and alerts, Grafana, compose.

These checks run the operators' own tools (systemd-analyze, promtool). CI installs
them (.ci/run), so a missing tool is a failure here, never a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# The local testnet of SPEC §10: node N is node_00N, RPC 800N, metrics 900N.
TESTNET_NODES = (1, 2, 3)
SEED_PANEL_EXPRESSIONS = {
    "rate(anna_consensus_rounds_total[5m])",
    "anna_average_tis",
    "anna_byzantine_nodes_total",
    'sum by (peer)(rate(anna_peer_request_total{status="success"}[5m])) / sum by (peer)(rate(anna_peer_request_total[5m]))',
}
ALERTS = {
    "AnnaNodeDown",
    "AnnaNoQuorum",
    "AnnaByzantineNodeDetected",
    "AnnaPeerDown",
    "AnnaReloadFailed",
    "AnnaTISDrift",
    "AnnaMigrationRollback",
}


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text())


def tool(name: str) -> str:
    """Path of a required operator tool; the test fails (not skips) without it."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (CI installs it in .ci/run)")
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


# --- systemd ---------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file, values in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def verify_unit(text: str, directory: Path) -> list[str]:
    """Problems systemd-analyze reports for a unit, with ExecStart made runnable."""
    fake_annad = directory / "annad"
    fake_annad.write_text("#!/bin/sh\nexit 0\n")
    fake_annad.chmod(0o755)
    unit = directory / "annad.service"
    unit.write_text(text.replace("/usr/local/bin/annad", str(fake_annad)))
    result = run(tool("systemd-analyze"), "verify", "--man=no", "--generators=no", str(unit))
    output = (result.stdout + result.stderr).splitlines()
    problems = [line for line in output if "annad.service" in line]
    if result.returncode != 0:
        problems.append(f"systemd-analyze exited {result.returncode}: {output}")
    return problems


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify reports nothing about conf/annad.service."""
    assert verify_unit((CONF / "annad.service").read_text(), tmp_path) == []


def test_systemd_analyze_check_catches_a_typo(tmp_path: Path) -> None:
    """The verify check fails on a misspelt key (systemd only warns and exits 0)."""
    text = (CONF / "annad.service").read_text().replace("WatchdogSec=", "WatchdogSecs=")
    assert any("WatchdogSecs" in problem for problem in verify_unit(text, tmp_path))


def test_systemd_unit_settings_match_the_contract() -> None:
    """Notify service, reload by SIGHUP, no restart on 65/78, watchdog, pinned paths."""
    settings = unit_settings((CONF / "annad.service").read_text())
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == ["/usr/local/bin/annad --config /etc/anna/annad.yml"]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert settings["Restart"] == ["on-failure"]
    assert set(settings["RestartPreventExitStatus"][0].split()) == {"78", "65"}
    assert settings["WatchdogSec"] == ["30"]
    assert settings["TimeoutStopSec"] == ["15"]
    assert settings["User"] == settings["Group"] == ["anna"]
    assert settings["StateDirectory"] == ["anna"]
    assert settings["StateDirectoryMode"] == ["0700"]
    assert settings["UMask"] == ["0077"]
    assert "ANNA_PID_FILE=/run/anna/annad.pid" in settings["Environment"]
    assert "ANNA_STATE_DIR=/var/lib/anna" in settings["Environment"]
    assert settings["CapabilityBoundingSet"] == [""]
    for hardening in (
        "ProtectSystem",
        "ProtectHome",
        "NoNewPrivileges",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert settings[hardening] in (["true"], ["strict"]), hardening
    assert settings["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]


# --- Prometheus ------------------------------------------------------------------------


def test_prometheus_config_passes_promtool() -> None:
    """promtool check config accepts conf/prometheus.yml and finds its rule file."""
    result = run(tool("promtool"), "check", "config", str(CONF / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_local_testnet_metrics_ports() -> None:
    """One `anna` job scraping 127.0.0.1:9001-9003, each labelled with its node id."""
    config = load_yaml(CONF / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "anna"
    scraped = {
        target: group["labels"]["node"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    assert scraped == {f"127.0.0.1:900{n}": f"node_00{n}" for n in TESTNET_NODES}


def test_alert_rules_pass_promtool_check() -> None:
    """promtool check rules accepts conf/alerts.yml."""
    result = run(tool("promtool"), "check", "rules", str(CONF / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    """promtool test rules passes conf/alerts_test.yml."""
    result = run(tool("promtool"), "test", "rules", str(CONF / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """Each alert of alerts.yml has a firing and a silent case in alerts_test.yml."""
    rules = [rule for group in load_yaml(CONF / "alerts.yml")["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} == ALERTS
    firing: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(CONF / "alerts_test.yml")["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert firing == ALERTS
    assert silent == ALERTS


# --- Grafana ---------------------------------------------------------------------------


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((CONF / "grafana" / "anna-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_grafana_dashboard_has_the_seed_panels() -> None:
    """The dashboard parses and queries the seed's four expressions, among others."""
    dashboard = json.loads((CONF / "grafana" / "anna-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert set(dashboard_expressions()) >= SEED_PANEL_EXPRESSIONS


def test_grafana_expressions_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query parses, checked by promtool as recording rules."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"anna:dashboard_query_{i}", "expr": expr}
                    for i, expr in enumerate(dashboard_expressions())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = run(tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose and Dockerfile ------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Any:
    return load_yaml(ROOT / "docker-compose.yml")


def test_compose_defines_init_and_three_nodes(compose: Any) -> None:
    """Services are init and anna-node-1..3, all built from the repository's image."""
    services = compose["services"]
    assert set(services) == {"init", *(f"anna-node-{n}" for n in TESTNET_NODES)}
    assert {service["image"] for service in services.values()} == {"anna-trio:local"}
    assert all(service["build"] == "." for service in services.values())


def test_compose_init_writes_the_testnet_for_containers(compose: Any) -> None:
    """init runs `annactl testnet init --dir /testnet --compose` into ./artifacts/testnet."""
    init = compose["services"]["init"]
    assert "annactl testnet init --dir /testnet --compose" in " ".join(init["command"])
    assert init["volumes"] == ["./artifacts/testnet:/testnet"]


@pytest.mark.parametrize("n", TESTNET_NODES)
def test_compose_node_agrees_with_local_testnet(compose: Any, n: int) -> None:
    """Node N: hostname, ports 800N and 900N→9090, its own state and TLS, env, init first."""
    node = compose["services"][f"anna-node-{n}"]
    assert node["hostname"] == f"anna-node-{n}"
    assert node["ports"] == [f"800{n}:800{n}", f"900{n}:9090"]
    assert node["environment"] == {
        "ANNA_NODE_ID": f"node_00{n}",
        "ANNA_PEERS": f"/testnet/node{n}/peers.yml",
        "ANNA_STATE_DIR": "/var/lib/anna",
        "ANNA_AUDIT_LOG": "/var/lib/anna/audit.jsonl",
        "ANNA_RPC_LISTEN": f"0.0.0.0:800{n}",
        "ANNA_METRICS_LISTEN": "0.0.0.0:9090",
        "ANNA_PID_FILE": "/var/lib/anna/annad.pid",
        "ANNA_FAILPOINTS_HTTP": "1",
    }
    volumes = node["volumes"]
    assert f"./artifacts/testnet/node{n}:/var/lib/anna" in volumes
    assert f"./artifacts/testnet/node{n}/peers.yml:/testnet/node{n}/peers.yml:ro" in volumes
    assert f"./artifacts/testnet/node{n}/tls:/testnet/node{n}/tls:ro" in volumes
    for volume in volumes:
        source = volume.split(":")[0]
        assert source.startswith(("./artifacts/testnet/ca/", f"./artifacts/testnet/node{n}"))
        assert not source.endswith("ca.key"), "the CA key never enters a node container"
        if volume.split(":")[1] != "/var/lib/anna":
            assert volume.endswith(":ro")
    assert node["depends_on"] == {"init": {"condition": "service_completed_successfully"}}


@pytest.mark.parametrize("n", TESTNET_NODES)
def test_compose_healthcheck_asks_ready(compose: Any, n: int) -> None:
    """The healthcheck fetches /ready on the metrics port with Python, not curl."""
    test = compose["services"][f"anna-node-{n}"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert "http://127.0.0.1:9090/ready" in test[3]
    compile(test[3], "healthcheck", "exec")


def run_init_service(compose: Any, testnet: Path) -> subprocess.CompletedProcess[str]:
    """The init service's script on this machine, with ./artifacts/testnet at `testnet`."""
    script = compose["services"]["init"]["command"][0]
    script = script.replace("/testnet", str(testnet)).replace("chown -R anna:anna", "true")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def host_path(container_path: PurePosixPath, volumes: list[str], artifacts: Path) -> Path:
    """Where a path inside a node container lives on the host, through its bind mounts."""
    container_path = PurePosixPath(os.path.normpath(container_path))
    best: tuple[PurePosixPath, str] | None = None
    for volume in volumes:
        source, target = volume.split(":")[:2]
        mount = PurePosixPath(target)
        if container_path.is_relative_to(mount) and (best is None or mount.is_relative_to(best[0])):
            best = (mount, source)
    assert best is not None, f"{container_path} is not mounted"
    mount, source = best
    source_path = artifacts / Path(source).relative_to("artifacts/testnet")
    return source_path / container_path.relative_to(mount)


def test_compose_init_output_resolves_inside_every_node(compose: Any, tmp_path: Path) -> None:
    """After init, every file a node's peers.yml and state dir name exists through its mounts."""
    artifacts = tmp_path / "artifacts" / "testnet"
    artifacts.mkdir(parents=True)
    result = run_init_service(compose, artifacts)
    assert result.returncode == 0, result.stderr
    for n in TESTNET_NODES:
        node = compose["services"][f"anna-node-{n}"]
        peers_path = PurePosixPath(node["environment"]["ANNA_PEERS"])
        peers = load_yaml(host_path(peers_path, node["volumes"], artifacts))
        assert [(p["node_id"], p["address"], p["port"]) for p in peers["peers"]] == [
            (f"node_00{m}", f"anna-node-{m}", 8000 + m) for m in TESTNET_NODES
        ]
        assert peers["tls"].pop("enabled") is True
        for name, value in peers["tls"].items():
            file = host_path(peers_path.parent / value, node["volumes"], artifacts)
            assert file.is_file(), f"node {n} tls.{name}: {value}"
        key = PurePosixPath(node["environment"]["ANNA_STATE_DIR"]) / "keys" / "node_id.sec"
        assert host_path(key, node["volumes"], artifacts).is_file()


def test_compose_init_is_idempotent_and_refuses_a_local_testnet(
    compose: Any, tmp_path: Path
) -> None:
    """A second `up` keeps the compose testnet; a local (127.0.0.1) one is refused."""
    compose_dir, local_dir = tmp_path / "compose", tmp_path / "local"
    assert run_init_service(compose, compose_dir).returncode == 0
    before = (compose_dir / "node1" / "keys" / "node_id.pub").read_text()
    assert run_init_service(compose, compose_dir).returncode == 0
    assert (compose_dir / "node1" / "keys" / "node_id.pub").read_text() == before
    annactl = Path(sys.executable).parent / "annactl"
    subprocess.run([annactl, "testnet", "init", "--dir", str(local_dir)], check=True, timeout=60)
    refused = run_init_service(compose, local_dir)
    assert refused.returncode != 0
    assert "local testnet" in refused.stderr


def test_dockerfile_runs_annad_as_anna() -> None:
    """python:3.11-slim, installs the package, non-root user, both ports, annad entrypoint."""
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(re.search(r"\bpip install \.", line) for line in lines)
    assert "USER anna" in lines
    assert "EXPOSE 8001 9090" in lines
    assert lines[-1] == 'ENTRYPOINT ["annad"]'


# --- example configuration -------------------------------------------------------------


def test_example_daemon_config_is_valid_for_annad() -> None:
    """conf/annad.yml passes annad's own settings validation (unknown keys are errors)."""
    from anna_trio.config import build_annad_parser, resolve_settings

    args = build_annad_parser().parse_args(["--config", str(CONF / "annad.yml")])
    settings = resolve_settings(args, {})
    assert settings.node_id == "node_001"
    assert settings.round_interval == 300
    assert settings.observer.kind == "file"


def test_example_peers_file_has_three_tls_nodes() -> None:
    """conf/peers.yml.example: three distinct validators, TLS on, files under /etc/anna/tls."""
    peers = load_yaml(CONF / "peers.yml.example")
    assert peers["allow_insecure_peers"] is False
    tls = peers["tls"]
    assert tls.pop("enabled") is True
    assert all(path.startswith("/etc/anna/tls/") for path in tls.values())
    ids = [peer["node_id"] for peer in peers["peers"]]
    assert ids == [f"node_00{n}" for n in TESTNET_NODES]
    assert len({(p["address"], p["port"]) for p in peers["peers"]}) == 3
