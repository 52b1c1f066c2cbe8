"""The crash-safe state v1 → v2 migration (SPEC §5), shared by annad and annactl.

``state.json`` is only ever replaced by one ``os.replace`` after the backup, its
checksum and the complete v2 document are durable and verified, so a crash at any step
leaves either the untouched v1 (migrated again next time) or a complete v2.

Exactly-once audit: the ``state_migration`` entry's audit_id N is reserved before the
replace and stored in the v2 document (``migration.audit_id``) and in the name of an
empty marker file, ``state.migration.pending.<N>``, created right after ``state.v2.json``
(a name needs no data fsync, only the directory sync the v2 files need anyway) and removed
once the entry is in the log (or, first, when the run rolls back or fails before the
replace). The replace is the only way ``state.v2.json`` disappears while the
marker exists, so at the next start "marker present, state.v2.json gone" means the
migration completed - even if an operator has rolled state.json back by hand since -
and an entry N above the log's last id is written then. Callers must therefore run
`migrate_state` before appending anything else to the audit log.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from .. import failpoints
from .._exceptions import MigrationRolledBack, StateError
from ..audit import AuditIdAllocator, AuditLog, IdReservation, utc_now_rfc3339
from ..durable import atomic_write_bytes, fsync_dir, make_dirs, write_synced
from .schema import (
    MIGRATION_FIELD,
    convert_v1_to_v2,
    encode_state,
    new_v2_state,
    parse_state,
    state_version,
)

if TYPE_CHECKING:
    from ..metrics import Metrics

STATE_NAME = "state.json"
V2_TEMP_NAME = "state.v2.json"
BACKUP_NAME = "state.backup.v1"
CHECKSUM_NAME = "state.backup.v1.sha256"
PENDING_PREFIX = "state.migration.pending."  # + the reserved audit_id; an empty file
AUDIT_IDS_NAME = "audit_ids.reserved"  # the allocator's durable high-water mark


class MigrationOutcome(enum.Enum):
    CREATED_FRESH = "created_fresh"
    ALREADY_V2 = "already_v2"
    MIGRATED = "migrated"


@attrs.frozen
class MigrationPlan:
    """What `migrate_state` would do, found without writing anything."""

    outcome: MigrationOutcome
    description: str


@attrs.frozen
class _Found:
    raw: bytes
    state: dict[str, Any]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_state(path: Path) -> _Found | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        state = parse_state(raw)
    except StateError as exc:
        raise StateError(f"{path}: {exc}") from exc
    return _Found(raw, state)


def _floor_of(state: dict[str, Any]) -> int:
    """The highest audit_id a state document says is already taken."""
    floor = 0
    if _is_int(state.get("last_audit_id")):
        floor = state["last_audit_id"]
    record = state.get(MIGRATION_FIELD)
    if isinstance(record, dict) and _is_int(record.get("audit_id")):
        floor = max(floor, record["audit_id"])
    return floor


def audit_floor_from_state(state_dir: Path) -> int:
    """Max audit_id recorded in state.json and the migration's files, for the allocator.

    Unreadable files count as 0 here; `migrate_state` reports them properly.
    """
    floor = 0
    for name in (STATE_NAME, V2_TEMP_NAME, BACKUP_NAME):
        try:
            found = _read_state(state_dir / name)
        except StateError:
            continue
        if found is not None:
            floor = max(floor, _floor_of(found.state))
    return max([floor, *_markers(state_dir).values()])


def node_allocator(state_dir: Path) -> AuditIdAllocator:
    """The node's audit_id allocator: above every id its state files record, handing out
    ids only below its durable reservation in the state dir (kept outside state.json,
    whose v1 bytes a rollback restores)."""
    return AuditIdAllocator(
        audit_floor_from_state(state_dir), IdReservation(state_dir / AUDIT_IDS_NAME)
    )


def _markers(state_dir: Path) -> dict[Path, int]:
    """Pending-audit markers and the audit_id each one names."""
    found: dict[Path, int] = {}
    for path in state_dir.glob(f"{PENDING_PREFIX}*"):
        suffix = path.name.removeprefix(PENDING_PREFIX)
        if suffix.isdigit():
            found[path] = int(suffix)
    return found


def _drop_markers(state_dir: Path) -> None:
    for path in _markers(state_dir):
        path.unlink(missing_ok=True)


def _backup_checksum(state_dir: Path) -> str | None:
    try:
        return (state_dir / CHECKSUM_NAME).read_text("ascii").split()[0]
    except (OSError, ValueError, IndexError):
        return None


def _completed_unrecorded(
    state_dir: Path, state: dict[str, Any], audit_last_id: int
) -> list[dict[str, Any]]:
    """Migration records of completed migrations whose audit entry is not in the log yet.

    Drops a marker left by a run that died before its replace (state.v2.json still there).
    """
    records: dict[int, dict[str, Any]] = {}
    markers = _markers(state_dir)
    if markers and (state_dir / V2_TEMP_NAME).exists():
        _drop_markers(state_dir)
        fsync_dir(state_dir)
    elif markers:
        checksum = _backup_checksum(state_dir)  # the backup of the run that replaced
        for audit_id in markers.values():
            records[audit_id] = {"audit_id": audit_id, "backup_checksum": checksum}
    own = state.get(MIGRATION_FIELD)
    if state_version(state) == 2 and isinstance(own, dict) and _is_int(own.get("audit_id")):
        records[own["audit_id"]] = own  # the v2 document's record is the fuller one
    return [records[key] for key in sorted(records) if key > audit_last_id]


def plan_migration(state_dir: Path, *, node_id: str) -> MigrationPlan:
    """Inspect the state dir read-only; raises StateError exactly when migration would."""
    state_path = state_dir / STATE_NAME
    found = _read_state(state_path)
    if found is None:
        return MigrationPlan(
            MigrationOutcome.CREATED_FRESH,
            f"no {state_path}: a fresh v2 state would be created for node {node_id}",
        )
    if state_version(found.state) == 2:
        return MigrationPlan(MigrationOutcome.ALREADY_V2, f"{state_path} is already v2")
    convert_v1_to_v2(found.state, node_id=node_id, now=utc_now_rfc3339())
    fields = len(found.state)
    return MigrationPlan(
        MigrationOutcome.MIGRATED,
        f"{state_path} is v1 ({len(found.raw)} bytes, {fields} fields, last_audit_id "
        f"{found.state.get('last_audit_id', 'none')}): would back it up to {BACKUP_NAME} "
        f"with {CHECKSUM_NAME} and replace it with v2 for node {node_id}",
    )


def migrate_state(
    state_dir: Path,
    *,
    node_id: str,
    audit: AuditLog,
    metrics: Metrics | None,
    log: logging.Logger,
    dry_run: bool = False,
) -> MigrationOutcome:
    """Bring state.json to v2, or report what would happen with ``dry_run``.

    Raises StateError (nothing modified) for unparseable, invalid or too-new state, and
    MigrationRolledBack after a failed verification restored v1.
    """
    if dry_run:
        plan = plan_migration(state_dir, node_id=node_id)
        log.info("Dry run: %s; nothing changed", plan.description)
        return plan.outcome
    state_path = state_dir / STATE_NAME
    found = _read_state(state_path)
    if found is None:
        make_dirs(state_dir)
        atomic_write_bytes(state_path, encode_state(new_v2_state(node_id=node_id, now=_now())))
        log.info("No state file: created a fresh v2 state at %s", state_path)
        return MigrationOutcome.CREATED_FRESH
    audit.ids.raise_floor(_floor_of(found.state))
    is_v2 = state_version(found.state) == 2
    if not is_v2:
        convert_v1_to_v2(found.state, node_id=node_id, now=_now())  # StateError before any write
    for record in _completed_unrecorded(state_dir, found.state, audit.last_audit_id):
        _record_interrupted_migration(record, audit, metrics, log)
    _drop_markers(state_dir)
    if is_v2:
        return MigrationOutcome.ALREADY_V2
    return _Migration(state_dir, found, node_id, audit, metrics, log).run()


def _now() -> str:
    return utc_now_rfc3339()


def _record_interrupted_migration(
    record: dict[str, Any], audit: AuditLog, metrics: Metrics | None, log: logging.Logger
) -> None:
    log.warning(
        "state.json was migrated to v2 but its state_migration audit entry is missing "
        "(interrupted before it was written); recording it now as audit_id %d",
        record["audit_id"],
    )
    audit.append(
        "state_migration",
        {
            "from_version": record.get("from_version", 1),
            "to_version": record.get("to_version", 2),
            "backup_checksum": record.get("backup_checksum"),
            "result": "success",
            "duration_ms": record.get("duration_ms"),
            "recovered": True,
        },
        audit_id=record["audit_id"],
    )
    if metrics is not None:
        metrics.migration_events.labels("success").inc()


class _Migration:
    """One v1 → v2 run: the §5 steps in order, a failpoint after each."""

    def __init__(
        self,
        state_dir: Path,
        found: _Found,
        node_id: str,
        audit: AuditLog,
        metrics: Metrics | None,
        log: logging.Logger,
    ) -> None:
        self.dir = state_dir
        self.found = found
        self.node_id = node_id
        self.audit = audit
        self.metrics = metrics
        self.log = log
        self.started = time.perf_counter()
        self.replaced = False
        self.marker: Path | None = None  # named after the audit_id once it is reserved

    def _elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 3)

    def run(self) -> MigrationOutcome:
        try:
            return self._steps()
        except MigrationRolledBack:
            raise
        except Exception as exc:
            if not self.replaced:
                self._record_failure(exc)
            raise

    def _steps(self) -> MigrationOutcome:
        log, state_dir = self.log, self.dir
        backup_path = state_dir / BACKUP_NAME
        v2_path = state_dir / V2_TEMP_NAME

        log.info("Starting state v1 → v2 migration")
        log.info("Creating backup of v1 state")
        write_synced(backup_path, self.found.raw)
        failpoints.hit("migrate.after_backup")

        log.info("Computing checksum of backup")
        checksum = hashlib.sha256(self.found.raw).hexdigest()
        write_synced(state_dir / CHECKSUM_NAME, f"{checksum}  {BACKUP_NAME}\n".encode())
        # Their names become durable with the v2 files' one directory sync, before the
        # replace: until then state.json is the v1, so nothing depends on them yet.
        if failpoints.hit("migrate.after_checksum"):
            _damage(backup_path)

        log.info("Loading v1 state")
        v1 = parse_state(self.found.raw)
        failpoints.hit("migrate.after_load")

        log.info("Converting v1 state to v2")
        now = _now()
        audit_id = self.audit.ids.next()  # reserved: the success entry takes exactly this id
        marker = self.marker = state_dir / f"{PENDING_PREFIX}{audit_id}"
        v2 = convert_v1_to_v2(v1, node_id=self.node_id, now=now)
        v2[MIGRATION_FIELD] = {
            "from_version": 1,
            "to_version": 2,
            "backup_checksum": checksum,
            "audit_id": audit_id,
            "migrated_at": now,
            "duration_ms": self._elapsed_ms(),
        }
        failpoints.hit("migrate.after_convert")

        log.info("Saving v2 state")
        encoded = encode_state(v2)
        write_synced(v2_path, encoded)
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        fsync_dir(state_dir)  # backup, checksum, v2 and marker durable before the replace
        failpoints.hit("migrate.after_save_v2")

        log.info("Verifying backup checksum")
        problem = _verification_problem(state_dir, checksum, encoded)
        if problem is not None:
            self._roll_back(problem)
        failpoints.hit("migrate.after_verify")

        os.replace(v2_path, state_dir / STATE_NAME)
        self.replaced = True
        fsync_dir(state_dir)
        failpoints.hit("migrate.after_replace")

        duration_ms = self._elapsed_ms()
        log.info("✓ State migration v1 → v2 completed successfully")
        self.audit.append(
            "state_migration",
            {
                "from_version": 1,
                "to_version": 2,
                "backup_checksum": checksum,
                "result": "success",
                "duration_ms": duration_ms,
            },
            audit_id=audit_id,
        )
        self._drop_marker()
        failpoints.hit("migrate.after_audit")
        if self.metrics is not None:
            self.metrics.migration_events.labels("success").inc()
        return MigrationOutcome.MIGRATED

    def _drop_marker(self) -> None:
        if self.marker is not None:
            self.marker.unlink(missing_ok=True)

    def _roll_back(self, problem: _Problem) -> None:
        log = self.log
        state_path = self.dir / STATE_NAME
        log.critical("CRITICAL: Rolling back to v1 state")
        if problem.checksum:
            log.critical("Backup checksum verification failed")
        log.critical("Migration verification failed: %s", problem.reason)
        if _read_or_none(state_path) != self.found.raw:
            atomic_write_bytes(state_path, self.found.raw)
        self._drop_marker()  # before state.v2.json: see module doc
        (self.dir / V2_TEMP_NAME).unlink(missing_ok=True)
        fsync_dir(self.dir)
        self.audit.append(
            "state_rollback",
            {"reason": problem.reason, "from_version": 1, "to_version": 2},
        )
        if self.metrics is not None:
            self.metrics.migration_events.labels("rollback").inc()
        raise MigrationRolledBack(
            f"state migration rolled back, {state_path} is the untouched v1 state: {problem.reason}"
        )

    def _record_failure(self, exc: Exception) -> None:
        """An error before the replace: state.json is still v1; drop the half-way v2."""
        self.log.error("State migration v1 → v2 failed, state.json left as v1: %s", exc)
        self._drop_marker()  # before state.v2.json: see module doc
        (self.dir / V2_TEMP_NAME).unlink(missing_ok=True)
        if self.metrics is not None:
            self.metrics.migration_events.labels("failure").inc()
        try:
            self.audit.append(
                "state_migration",
                {
                    "from_version": 1,
                    "to_version": 2,
                    "result": "failure",
                    "error": str(exc),
                    "duration_ms": self._elapsed_ms(),
                },
            )
        except OSError as audit_exc:
            self.log.error("could not record the failed migration in the audit log: %s", audit_exc)


@attrs.frozen
class _Problem:
    reason: str
    checksum: bool


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _damage(path: Path) -> None:
    """The `corrupt` failpoint: flip the backup's first byte, durably."""
    data = bytearray(path.read_bytes() or b"\0")
    data[0] ^= 0xFF
    write_synced(path, bytes(data))


def _verification_problem(state_dir: Path, checksum: str, encoded_v2: bytes) -> _Problem | None:
    """Step 6: the backup on disk matches its .sha256 and the v1 bytes; v2 reads back."""
    backup = _read_or_none(state_dir / BACKUP_NAME)
    recorded = (_read_or_none(state_dir / CHECKSUM_NAME) or b"").decode("ascii", "replace")
    actual = hashlib.sha256(backup).hexdigest() if backup is not None else "missing"
    if recorded != f"{checksum}  {BACKUP_NAME}\n" or actual != checksum:
        return _Problem(
            f"{BACKUP_NAME} has sha256 {actual}, expected {checksum}",
            checksum=True,
        )
    if _read_or_none(state_dir / V2_TEMP_NAME) != encoded_v2:
        return _Problem(f"{V2_TEMP_NAME} does not read back as written", checksum=False)
    return None
