"""Operations files: the systemd unit, Prometheus config and alerts, Grafana, examples.

docker-compose.yml and the Dockerfile are checked in tests/deploy (with docker-compose).

These checks run the operators' own tools (systemd-analyze, promtool). CI installs
them (.ci/run), so a missing tool is a failure here, never a skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
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


# --- example configuration -------------------------------------------------------------


def test_example_daemon_config_is_valid_for_annad() -> None:
    """conf/annad.yml passes annad's own settings validation (unknown keys are errors)."""
    from anna_trio.cli.annad import build_annad_parser
    from anna_trio.config import load_settings

    args = build_annad_parser().parse_args(["--config", str(CONF / "annad.yml")])
    settings = load_settings(vars(args), {})
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
