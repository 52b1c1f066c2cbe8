"""annad under a real systemd: one systemd-nspawn machine (systemd as PID 1, loopback only)
installed by docs/operations.md §1 command by command, conf/annad.service unchanged, a
one-node mTLS cluster, and a v1 state.json waiting for the first start. Then the unit's
promises, each as an operator sees them: start returns once ready, the seed's Migration
Guide, reload, watchdog, exit 78 without a restart loop, a clean stop, §3's manual
rollback and upgrade as written, the exposure score.

Drop-ins shorten what the unit would make a test wait for (WatchdogSec, RestartSec) and
are removed after the test that needs them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nspawn import Machine, booted
from runbook import section_blocks

from conftest import ROOT, follow, install_anna

STATE_V1 = {
    "schema_version": 1,
    "system_state": "configured",
    "last_boot_time": "2025-11-01T08:00:00Z",
    "configuration_hash": "abc123",
    "last_audit_id": 41,
    "total_audits": 12,
    "recent_audits": [{"audit_id": 41, "tis": 0.84}],
}
SEED_MIGRATION_LINES = (
    "Starting state v1 → v2 migration",
    "Creating backup of v1 state",
    "Computing checksum of backup",
    "Loading v1 state",
    "Converting v1 state to v2",
    "Saving v2 state",
    "Verifying backup checksum",
    "✓ State migration v1 → v2 completed successfully",
)
EXPOSURE_TODAY = 1.7  # `systemd-analyze security annad` when this suite was written: "1.7 OK"
DROP_IN = "/etc/systemd/system/annad.service.d/50-test.conf"
WAIT = 30.0


def peers_yml(pubkeys: dict[str, str]) -> str:
    lines = [
        "allow_insecure_peers: false",
        "tls:",
        "  enabled: true",
        "  ca_cert: /etc/anna/tls/ca.pem",
        "  server_cert: /etc/anna/tls/node.pem",
        "  server_key: /etc/anna/tls/node.key",
        "  client_cert: /etc/anna/tls/node.pem",
        "  client_key: /etc/anna/tls/node.key",
        "  crl: /etc/anna/tls/crl.pem",
        "peers:",
    ]
    for n, (node_id, pubkey) in enumerate(sorted(pubkeys.items()), start=1):
        lines += [f"  - node_id: {node_id}", "    address: 127.0.0.1", f"    port: 800{n}"]
        lines += [f"    pubkey: {pubkey}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def machine(machine_rootfs: Path, wheelhouse: Path) -> Iterator[Machine]:
    """Installed by §1; key, CA, certificate and peers file as section 2 makes them; the
    v1 state of a node upgraded from Phase 1.9 in place; annad not started yet."""
    with booted([Machine("anna-solo", machine_rootfs)]) as (solo,):
        install_anna(solo, wheelhouse)
        solo.run("sudo -u anna annactl keys init --keys-dir /var/lib/anna/keys")
        solo.run("annactl certs init-ca --out /root/anna-ca")
        solo.run(
            "annactl certs issue --ca-dir /root/anna-ca --node-id node_001 --san localhost"
            " --san 127.0.0.1 --out /root/node_001"
        )
        solo.run(
            "install -o root -g anna -m 0640 /root/anna-ca/ca.pem /root/anna-ca/crl.pem /etc/anna/tls/"
            " && install -o root -g anna -m 0640 /root/node_001/node_001.pem /etc/anna/tls/node.pem"
            " && install -o root -g anna -m 0640 /root/node_001/node_001.key /etc/anna/tls/node.key"
        )
        pubkey = solo.path("/var/lib/anna/keys/node_id.pub").read_text().strip()
        solo.path("/root/peers.yml").write_text(peers_yml({"node_001": pubkey}))
        solo.run("annactl config check --peers /root/peers.yml --node-id node_001")
        solo.run("install -o root -g anna -m 0640 /root/peers.yml /etc/anna/peers.yml")
        solo.path("/root/state.v1.json").write_text(json.dumps(STATE_V1, indent=2) + "\n")
        solo.run("install -o anna -g anna -m 0600 /root/state.v1.json /var/lib/anna/state.json")
        yield solo


def show(machine: Machine, *properties: str) -> dict[str, str]:
    output = machine.run(f"systemctl show annad -p {' -p '.join(properties)}").stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def audit_entries(machine: Machine, event: str) -> list[dict[str, Any]]:
    output = machine.run(f"jq -c 'select(.event == \"{event}\")' /var/log/anna/audit.jsonl").stdout
    return [json.loads(line) for line in output.splitlines()]


def metric_lines(machine: Machine, name: str) -> list[str]:
    output = machine.run(
        f"curl -fsS http://localhost:9090/metrics | grep '^{name}'", check=False
    ).stdout
    return output.splitlines()


def wait_until(what: str, check: Any, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:.0f} s waiting for {what}")
        time.sleep(0.2)


def ensure_running(machine: Machine) -> None:
    if show(machine, "ActiveState")["ActiveState"] != "active":
        machine.run("systemctl reset-failed annad; systemctl start annad")


@pytest.fixture
def drop_in(machine: Machine) -> Iterator[Any]:
    """Write a drop-in for annad (`drop_in("WatchdogSec=2", ...)`) and reload systemd;
    removed after the test, the unit restarted as shipped."""

    def write(*settings: str) -> None:
        path = machine.path(DROP_IN)
        path.parent.mkdir(exist_ok=True)
        path.write_text("[Service]\n" + "\n".join(settings) + "\n")
        machine.run("systemctl daemon-reload")

    yield write
    machine.path(DROP_IN).unlink(missing_ok=True)
    machine.run("systemctl daemon-reload && systemctl reset-failed annad; systemctl restart annad")


def test_start_returns_once_the_node_is_ready(machine: Machine) -> None:
    """`systemctl start` returns after READY=1: at that moment /ready answers, the pid
    file is written and the unit is active (not activating)."""
    machine.run(
        "systemctl start annad"
        " && curl -fsS http://127.0.0.1:9090/ready"
        " && test -s /run/anna/annad.pid"
        " && systemctl is-active annad"
    )
    assert show(machine, "Type")["Type"] == "notify"


def test_v1_state_is_migrated_as_the_seed_migration_guide_checks(machine: Machine) -> None:
    """The journal's migration lines in the seed's order, schema_version 2, the backup
    verifies with sha256sum -c and holds the v1 bytes, the metric, the audit entry."""
    ensure_running(machine)
    journal = machine.run("journalctl -u annad | grep migration").stdout
    positions = [journal.find(line) for line in SEED_MIGRATION_LINES]
    assert -1 not in positions, journal
    assert positions == sorted(positions), journal
    assert machine.run("jq .schema_version /var/lib/anna/state.json").stdout.strip() == "2"
    machine.run("ls -lh /var/lib/anna/state.backup.v1*")
    verified = machine.run("cd /var/lib/anna && sha256sum -c state.backup.v1.sha256").stdout
    assert verified.strip() == "state.backup.v1: OK"
    backup = json.loads(machine.path("/var/lib/anna/state.backup.v1").read_text())
    assert backup == STATE_V1
    assert 'anna_migration_events_total{result="success"} 1.0' in metric_lines(
        machine, "anna_migration_events_total"
    )
    (entry,) = audit_entries(machine, "state_migration")
    assert (entry["result"], entry["from_version"], entry["to_version"]) == ("success", 1, 2)
    assert entry["audit_id"] > STATE_V1["last_audit_id"]


def test_reload_applies_a_changed_peers_file(machine: Machine) -> None:
    """`systemctl reload annad` with a validator added: audit entry and metric say success."""
    ensure_running(machine)
    machine.run("test -d /root/node_002-keys || annactl keys init --keys-dir /root/node_002-keys")
    keys = {
        "node_001": machine.path("/var/lib/anna/keys/node_id.pub").read_text().strip(),
        "node_002": machine.path("/root/node_002-keys/node_id.pub").read_text().strip(),
    }
    machine.path("/etc/anna/peers.yml").write_text(peers_yml(keys))
    machine.run("systemctl reload annad")
    wait_until("a peer_reload audit entry", lambda: audit_entries(machine, "peer_reload"))
    (entry,) = audit_entries(machine, "peer_reload")
    assert entry["result"] == "success"
    assert entry["added"] == ["node_002"]
    assert 'anna_peer_reload_total{result="success"} 1.0' in metric_lines(
        machine, "anna_peer_reload_total"
    )
    assert show(machine, "ActiveState")["ActiveState"] == "active"


def test_watchdog_restarts_a_daemon_that_stopped_answering(machine: Machine, drop_in: Any) -> None:
    """A healthy daemon pings (WATCHDOG=1) and is left alone; SIGSTOPped, it stops pinging,
    and systemd kills it and starts a new one."""
    drop_in("WatchdogSec=2", "RestartSec=1")
    machine.run("systemctl restart annad")
    before = show(machine, "MainPID", "NRestarts")
    time.sleep(3)  # past WatchdogSec: a daemon that did not ping would be restarted by now
    assert show(machine, "MainPID", "NRestarts") == before
    machine.run(f"kill -STOP {before['MainPID']}")

    def restarted() -> bool:
        now = show(machine, "MainPID", "NRestarts", "ActiveState")
        return (
            now["ActiveState"] == "active"
            and now["MainPID"] not in ("0", before["MainPID"])
            and int(now["NRestarts"]) == int(before["NRestarts"]) + 1
        )

    wait_until("systemd to restart the stopped daemon", restarted)
    assert "Watchdog timeout" in machine.run("journalctl -u annad").stdout


def test_bad_configuration_fails_with_78_and_no_restart_loop(
    machine: Machine, drop_in: Any
) -> None:
    """An invalid peers file: exit 78, the unit failed and left so (RestartPreventExitStatus,
    with RestartSec=1 a loop would show within the wait), the reason in the journal."""
    drop_in("RestartSec=1")
    ensure_running(machine)
    good = machine.path("/etc/anna/peers.yml").read_text()
    machine.path("/etc/anna/peers.yml").write_text(
        good.replace(
            "allow_insecure_peers: false", "allow_insecure_peers: false\nquorum: sometimes"
        )
    )
    try:
        restarts = int(show(machine, "NRestarts")["NRestarts"])
        assert machine.run("systemctl restart annad", check=False).returncode != 0
        time.sleep(4)  # four RestartSec: nothing may happen, so there is nothing to wait for
        after = show(machine, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert (after["ActiveState"], after["Result"], after["ExecMainStatus"]) == (
            "failed",
            "exit-code",
            "78",
        )
        assert int(after["NRestarts"]) == restarts
        journal = machine.run("journalctl -u annad -n 20").stdout
        assert "quorum: must be one of majority, two_thirds; got 'sometimes'" in journal
    finally:
        machine.path("/etc/anna/peers.yml").write_text(good)


def test_stop_is_clean(machine: Machine) -> None:
    """`systemctl stop`: exit 0, daemon_stop last in the audit log, no pid file."""
    ensure_running(machine)
    machine.run("systemctl stop annad")
    after = show(machine, "ActiveState", "Result", "ExecMainStatus")
    assert after == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    # systemd counts a death by SIGTERM as success too: daemon_stop says annad drained.
    last = machine.path("/var/log/anna/audit.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["event"] == "daemon_stop"
    assert not machine.path("/run/anna/annad.pid").exists()


def test_the_upgrade_section_s_rollback_and_upgrade_work_as_written(machine: Machine) -> None:
    """docs/operations.md §3 typed as an operator would, on the node migrated above: the
    manual rollback gives back the v1 state.json byte for byte; the upgrade block's dry
    run changes nothing, and its start migrates the node again, as the journal shows."""
    ensure_running(machine)
    upgrade, rollback = section_blocks(ROOT / "docs" / "operations.md", "3. Upgrade from v1")
    follow(machine, rollback, cwd="/root")
    state = machine.path("/var/lib/anna/state.json")
    v1 = machine.path("/root/state.v1.json").read_bytes()
    assert state.read_bytes() == v1
    stop, dry_run, start, journal = upgrade.commands
    for command in (stop, dry_run):
        machine.run(command)
    assert state.read_bytes() == v1, "the dry run changed state.json"
    for command in (start, journal):
        machine.run(command)
    assert json.loads(state.read_text())["schema_version"] == 2
    migrations = audit_entries(machine, "state_migration")
    assert [e["result"] for e in migrations] == ["success", "success"], migrations


def test_security_exposure_is_no_worse_than_today(machine: Machine) -> None:
    """`systemd-analyze security annad` inside a real systemd: 1.7 "OK" or better."""
    report = machine.run("systemd-analyze security annad --no-pager").stdout
    match = re.search(r"Overall exposure level for annad\.service: ([0-9.]+) (\w+)", report)
    assert match is not None, report
    assert float(match.group(1)) <= EXPOSURE_TODAY, report
