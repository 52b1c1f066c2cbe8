"""The crash-safe v1 → v2 migration (SPEC §5), in process: steps, rollback, recovery."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from anna_trio import failpoints
from anna_trio._exceptions import FailpointError, MigrationRolledBack, StateError
from anna_trio.audit import AuditLog, verify_audit_log
from anna_trio.metrics import Metrics
from anna_trio.state.migration import (
    BACKUP_NAME,
    CHECKSUM_NAME,
    PENDING_PREFIX,
    STATE_NAME,
    V2_TEMP_NAME,
    MigrationOutcome,
    audit_floor_from_state,
    migrate_state,
    node_allocator,
    plan_migration,
)
from anna_trio.state.schema import parse_state, state_version, validate_v2
from state_strategies import v1_states

MIGRATION_FAILPOINTS = tuple(name for name in failpoints.NAMES if name.startswith("migrate."))
STEP_LINES = [
    "Starting state v1 → v2 migration",
    "Creating backup of v1 state",
    "Computing checksum of backup",
    "Loading v1 state",
    "Converting v1 state to v2",
    "Saving v2 state",
    "Verifying backup checksum",
    "✓ State migration v1 → v2 completed successfully",
]
V1 = {
    "system_state": "configured",
    "schema_version": 1,
    "last_boot_time": "2025-11-01T00:00:00Z",
    "configuration_hash": "abc123",
    "last_audit_id": 41,
    "total_audits": 12,
    "recent_audits": [{"id": "a1", "tis": 0.8}],
    "mirror_custom": {"nested": [1, 2, 3]},
}
LOG = logging.getLogger("anna_trio.migration.test")


@pytest.fixture(autouse=True)
def _disarm_failpoints() -> Iterator[None]:
    failpoints.load_from_env(None)
    yield
    failpoints.load_from_env(None)


def write_v1(state_dir: Path, state: dict[str, Any] = V1) -> bytes:
    raw = json.dumps(state, indent=1).encode()
    (state_dir / STATE_NAME).write_bytes(raw)
    return raw


@contextlib.contextmanager
def opened_audit(state_dir: Path, path: Path) -> Iterator[AuditLog]:
    """A node start: allocator floor from the state dir, the audit log's tail on top."""
    log = AuditLog.open(path, "node_001", node_allocator(state_dir))
    try:
        yield log
    finally:
        log.close()


def run_migration(
    state_dir: Path, audit_path: Path, metrics: Metrics | None = None
) -> MigrationOutcome:
    with opened_audit(state_dir, audit_path) as audit:
        return migrate_state(state_dir, node_id="node_001", audit=audit, metrics=metrics, log=LOG)


def audit_entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def metric(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("anna_migration_events_total", {"result": result})
    assert value is not None
    return value


def test_migration_logs_every_step_in_order_and_writes_the_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A v1 state migrates with SPEC §5's log lines, backup, checksum, audit entry and metric."""
    raw = write_v1(tmp_path)
    metrics = Metrics("node_001")
    with caplog.at_level(logging.INFO, logger=LOG.name):
        outcome = run_migration(tmp_path, tmp_path / "audit.jsonl", metrics)
    assert outcome is MigrationOutcome.MIGRATED
    assert [r.getMessage() for r in caplog.records if r.name == LOG.name] == STEP_LINES
    assert (tmp_path / BACKUP_NAME).read_bytes() == raw
    digest = hashlib.sha256(raw).hexdigest()
    assert (tmp_path / CHECKSUM_NAME).read_text() == f"{digest}  {BACKUP_NAME}\n"
    assert not (tmp_path / V2_TEMP_NAME).exists()
    v2 = parse_state((tmp_path / STATE_NAME).read_bytes())
    validate_v2(v2)
    assert {k: v2[k] for k in V1 if k != "schema_version"} == {
        k: v for k, v in V1.items() if k != "schema_version"
    }
    [entry] = audit_entries(tmp_path / "audit.jsonl")
    assert entry["event"] == "state_migration"
    assert entry["audit_id"] == 42  # above v1's last_audit_id
    assert (entry["from_version"], entry["to_version"], entry["result"]) == (1, 2, "success")
    assert entry["backup_checksum"] == digest
    assert isinstance(entry["duration_ms"], float)
    assert metric(metrics, "success") == 1


def test_already_v2_is_not_rewritten(tmp_path: Path) -> None:
    """A second run finds v2 and changes no file and writes no audit entry."""
    write_v1(tmp_path)
    run_migration(tmp_path, tmp_path / "audit.jsonl")
    before = snapshot(tmp_path)
    assert run_migration(tmp_path, tmp_path / "audit.jsonl") is MigrationOutcome.ALREADY_V2
    assert snapshot(tmp_path) == before


def test_missing_state_creates_a_fresh_v2(tmp_path: Path) -> None:
    """No state file: a valid fresh v2 for this node is written."""
    state_dir = tmp_path / "new"
    state_dir.mkdir()
    assert run_migration(state_dir, tmp_path / "audit.jsonl") is MigrationOutcome.CREATED_FRESH
    state = parse_state((state_dir / STATE_NAME).read_bytes())
    assert state["node_id"] == "node_001" and state_version(state) == 2
    assert sorted(p.name for p in state_dir.iterdir()) == [STATE_NAME]


@pytest.mark.parametrize(
    "raw",
    [b"{truncated", b'{"schema_version": 3, "system_state": "x"}', b"[]", b'{"system_state": 5}'],
)
def test_unreadable_or_newer_state_is_exit_65_and_nothing_changes(
    tmp_path: Path, raw: bytes
) -> None:
    """StateError (65) and every file byte-identical: no backup, no audit entry."""
    (tmp_path / STATE_NAME).write_bytes(raw)
    before = snapshot(tmp_path)
    with pytest.raises(StateError) as caught:
        run_migration(tmp_path, tmp_path / "logs" / "audit.jsonl")
    assert caught.value.exit_code == 65
    assert snapshot(tmp_path) == before
    assert audit_entries(tmp_path / "logs" / "audit.jsonl") == []


def test_corrupt_backup_rolls_back_then_next_run_migrates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """corrupt at after_checksum: CRITICAL lines, v1 untouched, state_rollback, rollback metric."""
    raw = write_v1(tmp_path)
    metrics = Metrics("node_001")
    failpoints.arm("migrate.after_checksum", "corrupt")
    with (
        caplog.at_level(logging.INFO, logger=LOG.name),
        pytest.raises(MigrationRolledBack) as caught,
    ):
        run_migration(tmp_path, tmp_path / "audit.jsonl", metrics)
    assert caught.value.exit_code == 78
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "CRITICAL: Rolling back to v1 state" in messages
    assert "Backup checksum verification failed" in messages
    assert (tmp_path / STATE_NAME).read_bytes() == raw
    assert not (tmp_path / V2_TEMP_NAME).exists()
    [entry] = audit_entries(tmp_path / "audit.jsonl")
    assert entry["event"] == "state_rollback" and "sha256" in entry["reason"]
    assert metric(metrics, "rollback") == 1 and metric(metrics, "success") == 0

    failpoints.disarm("migrate.after_checksum")
    assert run_migration(tmp_path, tmp_path / "audit.jsonl") is MigrationOutcome.MIGRATED
    ids = [e["audit_id"] for e in audit_entries(tmp_path / "audit.jsonl")]
    assert ids == sorted(set(ids)) and ids[0] > V1["last_audit_id"]
    assert verify_audit_log(tmp_path / "audit.jsonl").ok


@pytest.mark.parametrize("name", MIGRATION_FAILPOINTS)
def test_error_failpoint_is_a_clean_error_without_half_written_files(
    tmp_path: Path, name: str
) -> None:
    """error at any step raises; state.json is v1-intact or complete v2, no state.v2.json left."""
    raw = write_v1(tmp_path)
    metrics = Metrics("node_001")
    failpoints.arm(name, "error")
    with pytest.raises(FailpointError):
        run_migration(tmp_path, tmp_path / "audit.jsonl", metrics)
    failpoints.load_from_env(None)
    assert not (tmp_path / V2_TEMP_NAME).exists()
    current = (tmp_path / STATE_NAME).read_bytes()
    replaced = name in ("migrate.after_replace", "migrate.after_audit")
    if replaced:
        validate_v2(parse_state(current))
    else:
        assert current == raw
        assert metric(metrics, "failure") == 1
    run_migration(tmp_path, tmp_path / "audit.jsonl")
    entries = audit_entries(tmp_path / "audit.jsonl")
    successes = [e for e in entries if e["event"] == "state_migration" and e["result"] == "success"]
    assert len(successes) == 1
    assert verify_audit_log(tmp_path / "audit.jsonl").ok


def test_exit_between_replace_and_audit_is_recorded_once_on_next_start(tmp_path: Path) -> None:
    """State replaced but no entry written: the next start writes it with the reserved id."""
    write_v1(tmp_path)

    with killed_at("migrate.after_replace"), pytest.raises(SimulatedKill):
        run_migration(tmp_path, tmp_path / "audit.jsonl")
    assert audit_entries(tmp_path / "audit.jsonl") == []
    reserved = parse_state((tmp_path / STATE_NAME).read_bytes())["migration"]["audit_id"]
    metrics = Metrics("node_001")
    assert run_migration(tmp_path, tmp_path / "audit.jsonl", metrics) is MigrationOutcome.ALREADY_V2
    assert run_migration(tmp_path, tmp_path / "audit.jsonl") is MigrationOutcome.ALREADY_V2
    [entry] = audit_entries(tmp_path / "audit.jsonl")
    assert (entry["event"], entry["audit_id"], entry["recovered"]) == (
        "state_migration",
        reserved,
        True,
    )
    assert metric(metrics, "success") == 1


def test_completed_migration_is_recorded_even_after_a_manual_rollback(tmp_path: Path) -> None:
    """Killed after the replace, rolled back by hand before the next start: still recorded once."""
    raw = write_v1(tmp_path)

    with killed_at("migrate.after_replace"), pytest.raises(SimulatedKill):
        run_migration(tmp_path, tmp_path / "audit.jsonl")
    shutil.copyfile(tmp_path / BACKUP_NAME, tmp_path / STATE_NAME)
    assert (tmp_path / STATE_NAME).read_bytes() == raw
    assert run_migration(tmp_path, tmp_path / "audit.jsonl") is MigrationOutcome.MIGRATED
    entries = audit_entries(tmp_path / "audit.jsonl")
    assert [(e["event"], e.get("recovered", False)) for e in entries] == [
        ("state_migration", True),
        ("state_migration", False),
    ]
    assert not list(tmp_path.glob(f"{PENDING_PREFIX}*"))


def test_marker_of_a_run_killed_before_its_replace_is_discarded(tmp_path: Path) -> None:
    """Killed between writing the marker and the replace: no migration is recorded for it."""
    write_v1(tmp_path)

    real_replace = os.replace

    def die_at_state_replace(src: Path, dst: Path) -> None:
        if Path(dst).name == STATE_NAME:
            raise SimulatedKill("os.replace")
        real_replace(src, dst)

    with mock.patch("os.replace", die_at_state_replace), pytest.raises(SimulatedKill):
        run_migration(tmp_path, tmp_path / "audit.jsonl")
    assert list(tmp_path.glob(f"{PENDING_PREFIX}*")) and (tmp_path / V2_TEMP_NAME).exists()
    assert run_migration(tmp_path, tmp_path / "audit.jsonl") is MigrationOutcome.MIGRATED
    entries = audit_entries(tmp_path / "audit.jsonl")
    assert [e.get("recovered", False) for e in entries] == [False]


def test_manual_rollback_with_real_sha256sum_restores_v1_bytes(tmp_path: Path) -> None:
    """`sha256sum -c state.backup.v1.sha256 && cp state.backup.v1 state.json` gives back v1."""
    raw = write_v1(tmp_path)
    run_migration(tmp_path, tmp_path / "audit.jsonl")
    sha256sum = shutil.which("sha256sum")
    assert sha256sum is not None
    check = subprocess.run(
        [sha256sum, "-c", CHECKSUM_NAME], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == f"{BACKUP_NAME}: OK"
    subprocess.run(["cp", BACKUP_NAME, STATE_NAME], cwd=tmp_path, check=True)
    assert (tmp_path / STATE_NAME).read_bytes() == raw


def test_manual_rollback_refuses_a_damaged_backup(tmp_path: Path) -> None:
    """sha256sum -c fails on a changed backup, so the runbook's && stops before cp."""
    write_v1(tmp_path)
    run_migration(tmp_path, tmp_path / "audit.jsonl")
    with (tmp_path / BACKUP_NAME).open("ab") as file:
        file.write(b" ")
    check = subprocess.run(
        ["sha256sum", "-c", CHECKSUM_NAME], cwd=tmp_path, capture_output=True, check=False
    )
    assert check.returncode != 0


def test_dry_run_changes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """dry_run reports the plan and leaves every file and the audit log alone."""
    write_v1(tmp_path)
    before = snapshot(tmp_path)
    with (
        caplog.at_level(logging.INFO, logger=LOG.name),
        opened_audit(tmp_path, tmp_path / "a.jsonl") as audit,
    ):
        outcome = migrate_state(
            tmp_path, node_id="node_001", audit=audit, metrics=None, log=LOG, dry_run=True
        )
    assert outcome is MigrationOutcome.MIGRATED
    assert "Dry run" in caplog.text and "would back it up" in caplog.text
    assert snapshot(tmp_path) == before | {"a.jsonl": b""}
    assert plan_migration(tmp_path, node_id="n").outcome is MigrationOutcome.MIGRATED


def test_audit_floor_covers_state_and_stale_migration_files(tmp_path: Path) -> None:
    """The daemon's allocator floor is the max id in state.json, state.v2.json and the backup."""
    assert audit_floor_from_state(tmp_path) == 0
    write_v1(tmp_path)
    assert audit_floor_from_state(tmp_path) == 41
    (tmp_path / V2_TEMP_NAME).write_text('{"schema_version": 2}')  # half-written: ignored
    assert audit_floor_from_state(tmp_path) == 41
    run_migration(tmp_path, tmp_path / "audit.jsonl")
    assert audit_floor_from_state(tmp_path) == 42  # migration.audit_id


# --- the property: any sequence of starts, crashes, rollbacks and writes keeps the invariants


class SimulatedKill(BaseException):
    """Stands in for kill -9 at a failpoint: no `except Exception` cleanup runs."""


def killed_at(failpoint: str) -> contextlib.AbstractContextManager[Any]:
    """Within it, reaching `failpoint` raises SimulatedKill (kill -9 right there)."""

    def crash(name: str) -> bool:
        if name == failpoint:
            raise SimulatedKill(name)
        return False

    return mock.patch.object(failpoints, "hit", crash)


class MigrationMachine(RuleBasedStateMachine):
    """A node's life: migrations interrupted anywhere, rollbacks, audit writes, restarts."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.state_dir = root / "state"
        self.audit_path = root / "log" / "audit.jsonl"
        self.v1_raw = b""
        self.v1: dict[str, Any] = {}
        self.completed_migrations = 0

    @initialize(v1=v1_states())
    def start_with_v1(self, v1: dict[str, Any]) -> None:
        shutil.rmtree(self.state_dir.parent, ignore_errors=True)
        self.state_dir.mkdir(parents=True)
        self.v1 = v1
        self.v1_raw = json.dumps(v1).encode()
        (self.state_dir / STATE_NAME).write_bytes(self.v1_raw)

    def _is_v1(self) -> bool:
        return (self.state_dir / STATE_NAME).read_bytes() == self.v1_raw

    def _start(self) -> None:
        was_v1 = self._is_v1()
        try:
            run_migration(self.state_dir, self.audit_path)
        finally:
            if was_v1 and not self._is_v1():
                self.completed_migrations += 1

    @rule()
    def start_node(self) -> None:
        """A clean start migrates (or finds v2) and records every completed migration once."""
        self._start()
        successes = [
            e
            for e in audit_entries(self.audit_path)
            if e["event"] == "state_migration" and e["result"] == "success"
        ]
        assert len(successes) == self.completed_migrations

    @rule(name=st.sampled_from(MIGRATION_FAILPOINTS))
    def crash_at(self, name: str) -> None:
        """kill -9 at a failpoint (simulated by raising past every `except Exception`)."""
        with killed_at(name), contextlib.suppress(SimulatedKill):
            self._start()

    @rule(name=st.sampled_from(MIGRATION_FAILPOINTS))
    def error_at(self, name: str) -> None:
        """An `error` failpoint raises cleanly."""
        failpoints.arm(name, "error")
        try:
            with contextlib.suppress(FailpointError):
                self._start()
        finally:
            failpoints.disarm(name)

    @rule()
    def corrupt_backup(self) -> None:
        """corrupt at after_checksum: a migration from v1 rolls back and leaves v1."""
        was_v1 = self._is_v1()
        failpoints.arm("migrate.after_checksum", "corrupt")
        try:
            with contextlib.suppress(MigrationRolledBack):
                self._start()
        finally:
            failpoints.disarm("migrate.after_checksum")
        assert self._is_v1() == was_v1

    @rule()
    def manual_rollback(self) -> None:
        """The operator runbook: check the backup's checksum, copy it over state.json."""
        backup, checksum = self.state_dir / BACKUP_NAME, self.state_dir / CHECKSUM_NAME
        if self._is_v1() or not backup.exists() or not checksum.exists():
            return
        expected = checksum.read_text().split()[0]
        if hashlib.sha256(backup.read_bytes()).hexdigest() == expected:
            shutil.copyfile(backup, self.state_dir / STATE_NAME)
            assert self._is_v1()

    @rule(count=st.integers(1, 3))
    def daemon_writes_audit_entries(self, count: int) -> None:
        """A running node (after its start-up migration) appends entries."""
        with contextlib.suppress(MigrationRolledBack):
            self._start()
        with opened_audit(self.state_dir, self.audit_path) as audit:
            for _ in range(count):
                audit.append("daemon_start", {})

    @rule(fragment=st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b))
    def killed_mid_append(self, fragment: bytes) -> None:
        """A torn last line is removed when the log is next opened."""
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        with self.audit_path.open("ab") as file:
            file.write(fragment)
        with opened_audit(self.state_dir, self.audit_path):
            pass

    @invariant()
    def audit_log_verifies_above_v1_ids(self) -> None:
        if not self.audit_path.exists():
            return
        result = verify_audit_log(self.audit_path)
        assert result.ok, result
        ids = [e["audit_id"] for e in audit_entries(self.audit_path)]
        assert all(i > self.v1.get("last_audit_id", 0) for i in ids)

    @invariant()
    def state_is_v1_intact_or_complete_v2(self) -> None:
        if not self.v1_raw or self._is_v1():
            return
        v2 = parse_state((self.state_dir / STATE_NAME).read_bytes())
        validate_v2(v2)
        for key, value in self.v1.items():
            if key != "schema_version":
                assert v2[key] == value


def test_migration_state_machine(tmp_path: Path) -> None:
    """Under any interleaving: ids increase, chain verifies, state is v1-intact or full v2."""
    # Crashes are simulated in process, so page-cache durability is not under test here:
    # skipping fsync lets the machine explore many more interleavings in the time budget.
    with mock.patch("os.fsync"):
        run_state_machine_as_test(
            lambda: MigrationMachine(tmp_path),  # type: ignore[arg-type]  # any factory works
            settings=settings(max_examples=40, stateful_step_count=15, deadline=None),
        )
