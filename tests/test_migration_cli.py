"""annactl migrate-state-v2 and annactl audit verify as real processes (SPEC §1, §4, §5, §7)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from anna_trio import failpoints
from anna_trio.audit import verify_audit_log
from anna_trio.state.lock import StateDirLock
from anna_trio.state.migration import BACKUP_NAME, STATE_NAME, V2_TEMP_NAME
from anna_trio.state.schema import parse_state, validate_v2

ANNACTL = [sys.executable, "-c", "from anna_trio.cli.annactl import main; main()"]
MIGRATION_FAILPOINTS = tuple(name for name in failpoints.NAMES if name.startswith("migrate."))
V1 = {
    "system_state": "configured",
    "last_audit_id": 500,
    "configuration_hash": "abc123",
    "total_audits": 3,
    "recent_audits": [{"id": "a", "tis": 0.91}],
    "unknown_field": {"kept": ["verbatim", 1.5, None]},
}


def annactl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ANNA_") and k != "NODE_ID"}
    return subprocess.run(
        [*ANNACTL, *args],
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def node(tmp_path: Path) -> dict[str, Path]:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / STATE_NAME).write_bytes(json.dumps(V1).encode())
    return {"state_dir": state_dir, "audit": tmp_path / "log" / "audit.jsonl"}


def migrate(node: dict[str, Path], *extra: str, env: dict[str, str] | None = None) -> Any:
    return annactl(
        "migrate-state-v2",
        "--state-dir",
        str(node["state_dir"]),
        "--audit-log",
        str(node["audit"]),
        "--node-id",
        "node_001",
        *extra,
        env=env,
    )


def entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def assert_migrated_once(node: dict[str, Path]) -> None:
    state = parse_state((node["state_dir"] / STATE_NAME).read_bytes())
    validate_v2(state)
    for key, value in V1.items():
        assert state[key] == value
    assert not (node["state_dir"] / V2_TEMP_NAME).exists()
    assert verify_audit_log(node["audit"]).ok
    log = entries(node["audit"])
    assert all(e["audit_id"] > V1["last_audit_id"] for e in log)
    successes = [e for e in log if e["event"] == "state_migration" and e["result"] == "success"]
    assert len(successes) == 1


def test_clean_migration_prints_the_steps_and_exits_0(node: dict[str, Path]) -> None:
    """The §5 log lines go to stderr in order; exit 0; v2 written; entry audited."""
    result = migrate(node)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "INFO Starting state v1 → v2 migration"
    assert lines[-1] == "INFO ✓ State migration v1 → v2 completed successfully"
    assert "INFO Verifying backup checksum" in lines
    assert "migrated to schema v2" in result.stdout
    assert_migrated_once(node)
    again = migrate(node)
    assert again.returncode == 0 and "already schema v2" in again.stdout


def spawn_migrate(node: dict[str, Path], env: dict[str, str]) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ANNA_") and k != "NODE_ID"}
    args = ["--state-dir", str(node["state_dir"]), "--audit-log", str(node["audit"])]
    return subprocess.Popen(
        [*ANNACTL, "migrate-state-v2", *args, "--node-id", "node_001"],
        env=clean | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_at_each_failpoint_then_restart_leaves_v1_or_complete_v2(tmp_path: Path) -> None:
    """exit (SIGKILL) at each step: state is v1-intact or complete v2; a rerun finishes once."""
    nodes = {}
    for name in MIGRATION_FAILPOINTS:  # one node per failpoint, all killed in parallel
        state_dir = tmp_path / name / "state"
        state_dir.mkdir(parents=True)
        (state_dir / STATE_NAME).write_bytes(json.dumps(V1).encode())
        nodes[name] = {"state_dir": state_dir, "audit": tmp_path / name / "audit.jsonl"}
    v1_raw = json.dumps(V1).encode()
    killed = {n: spawn_migrate(node, {"ANNA_FAILPOINTS": f"{n}=exit"}) for n, node in nodes.items()}
    for name, process in killed.items():
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL, (name, stderr)
        current = (nodes[name]["state_dir"] / STATE_NAME).read_bytes()
        if current != v1_raw:
            validate_v2(parse_state(current))
    reruns = {name: spawn_migrate(node, {}) for name, node in nodes.items()}
    for name, process in reruns.items():
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, (name, stderr)
        assert_migrated_once(nodes[name])


def test_corrupt_backup_rolls_back_with_exit_78_then_next_run_migrates(
    node: dict[str, Path],
) -> None:
    """corrupt at after_checksum: CRITICAL lines, exit 78, v1 bytes kept, state_rollback entry."""
    v1_raw = (node["state_dir"] / STATE_NAME).read_bytes()
    result = migrate(node, env={"ANNA_FAILPOINTS": "migrate.after_checksum=corrupt"})
    assert result.returncode == 78
    assert "CRITICAL: Rolling back to v1 state" in result.stderr
    assert "Backup checksum verification failed" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("annactl: state migration rolled back")
    assert (node["state_dir"] / STATE_NAME).read_bytes() == v1_raw
    assert not (node["state_dir"] / V2_TEMP_NAME).exists()
    assert [e["event"] for e in entries(node["audit"])] == ["state_rollback"]
    assert migrate(node).returncode == 0
    assert_migrated_once(node)


def test_error_failpoint_is_one_clear_line_and_exit_1(node: dict[str, Path]) -> None:
    """error at a step: exit 1 with one `annactl:` line, v1 untouched, no state.v2.json."""
    v1_raw = (node["state_dir"] / STATE_NAME).read_bytes()
    result = migrate(node, env={"ANNA_FAILPOINTS": "migrate.after_save_v2=error"})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "annactl: failpoint migrate.after_save_v2 fired (error)"
    )
    assert (node["state_dir"] / STATE_NAME).read_bytes() == v1_raw
    assert not (node["state_dir"] / V2_TEMP_NAME).exists()


@pytest.mark.parametrize(
    "raw", [b'{"system_state": "x", "schema_version": 3}', b'{"system_state": "x",', b"\x00\x01"]
)
def test_unreadable_or_newer_state_exits_65_and_modifies_nothing(
    node: dict[str, Path], raw: bytes
) -> None:
    """Exit 65 with a clear line; every file in the state dir is byte-identical, no backup."""
    (node["state_dir"] / STATE_NAME).write_bytes(raw)
    before = snapshot(node["state_dir"])
    result = migrate(node)
    assert result.returncode == 65
    assert "nothing was modified" in result.stderr
    after = snapshot(node["state_dir"])
    after.pop(".lock", None)
    assert after == before
    assert entries(node["audit"]) == []


def test_refuses_while_another_process_holds_the_lock(node: dict[str, Path]) -> None:
    """A held state-dir lock: exit 78 naming the holder's pid; nothing migrated."""
    with StateDirLock(node["state_dir"]):
        result = migrate(node)
    assert result.returncode == 78
    assert f"(pid {os.getpid()}) holds the lock on {node['state_dir']}" in result.stderr
    assert parse_state((node["state_dir"] / STATE_NAME).read_bytes()).get("schema_version") is None


def test_dry_run_changes_nothing(node: dict[str, Path]) -> None:
    """--dry-run says what would happen and writes no file at all."""
    before = snapshot(node["state_dir"])
    result = migrate(node, "--dry-run")
    assert result.returncode == 0
    assert "would back it up to state.backup.v1" in result.stdout
    assert snapshot(node["state_dir"]) == before
    assert not node["audit"].parent.exists()


def test_environment_supplies_state_dir_audit_log_and_node_id(node: dict[str, Path]) -> None:
    """ANNA_STATE_DIR, ANNA_AUDIT_LOG and ANNA_NODE_ID stand in for the flags."""
    result = annactl(
        "migrate-state-v2",
        env={
            "ANNA_STATE_DIR": str(node["state_dir"]),
            "ANNA_AUDIT_LOG": str(node["audit"]),
            "ANNA_NODE_ID": "node_007",
        },
    )
    assert result.returncode == 0, result.stderr
    assert parse_state((node["state_dir"] / STATE_NAME).read_bytes())["node_id"] == "node_007"
    assert entries(node["audit"])[0]["node_id"] == "node_007"


def test_usage_and_config_errors(node: dict[str, Path], tmp_path: Path) -> None:
    """No node id for a v1 state: exit 2; missing state dir or bad ANNA_FAILPOINTS: exit 78."""
    no_id = annactl("migrate-state-v2", "--state-dir", str(node["state_dir"]))
    assert no_id.returncode == 2 and "--node-id" in no_id.stderr
    missing = annactl("migrate-state-v2", "--state-dir", str(tmp_path / "nope"), "--node-id", "n")
    assert missing.returncode == 78 and "does not exist" in missing.stderr
    bad = migrate(node, env={"ANNA_FAILPOINTS": "migrate.after_backup=explode"})
    assert bad.returncode == 78 and "explode" in bad.stderr


def test_manual_rollback_runbook_after_cli_migration(node: dict[str, Path]) -> None:
    """The operator runbook restores the v1 bytes with the real sha256sum and cp."""
    v1_raw = (node["state_dir"] / STATE_NAME).read_bytes()
    assert migrate(node).returncode == 0
    subprocess.run(
        f"sha256sum -c {BACKUP_NAME}.sha256 && cp {BACKUP_NAME} {STATE_NAME}",
        shell=True,
        cwd=node["state_dir"],
        check=True,
        capture_output=True,
    )
    assert (node["state_dir"] / STATE_NAME).read_bytes() == v1_raw


def test_audit_verify_ok_and_names_the_first_bad_line(node: dict[str, Path]) -> None:
    """audit verify: exit 0 `OK: N entries, audit_id A..B, chain verified …`, 1 naming the line."""
    migrate(node, env={"ANNA_FAILPOINTS": "migrate.after_checksum=corrupt"})
    migrate(node)
    ok = annactl("audit", "verify", "--audit-log", str(node["audit"]))
    assert ok.returncode == 0
    assert ok.stdout.strip() == (
        "OK: 2 entries, audit_id 502..503, chain verified through its anchor (audit_id 503)"
    )
    first, second = node["audit"].read_text().splitlines()
    node["audit"].write_text(f"{second}\n{first}\n")
    bad = annactl("audit", "verify", env={"ANNA_AUDIT_LOG": str(node["audit"])})
    assert bad.returncode == 1
    assert "line 1:" in bad.stdout and "prev_hash" in bad.stdout
    as_json = json.loads(
        annactl("audit", "verify", "--json", "--audit-log", str(node["audit"])).stdout
    )
    assert (as_json["ok"], as_json["first_bad_line"]) == (False, 1)
    missing = annactl("audit", "verify", "--audit-log", str(node["audit"]) + ".missing")
    assert missing.returncode == 1 and "cannot read audit log" in missing.stderr
