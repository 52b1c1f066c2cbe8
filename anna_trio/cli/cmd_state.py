"""annactl migrate-state-v2 and annactl audit verify: offline work on state and audit files.

Standard library only at module level (annactl --help stays fast).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_STATE_DIR = "/var/lib/anna"
DEFAULT_AUDIT_LOG = "/var/log/anna/audit.jsonl"
EXIT_OK, EXIT_BAD, EXIT_USAGE, EXIT_DATA, EXIT_CONFIG = 0, 1, 2, 65, 78


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    migrate = commands.add_parser(
        "migrate-state-v2",
        help="migrate state.json from schema v1 to v2 (offline)",
        description=(
            "Back up state.json to state.backup.v1 (+ .sha256), convert it to schema v2 and "
            "replace it atomically; roll back (exit 78) when verification fails. Refuses "
            "while a daemon holds the state-dir lock. Honours ANNA_FAILPOINTS."
        ),
    )
    migrate.add_argument(
        "--state-dir", type=Path, help=f"env ANNA_STATE_DIR, default {DEFAULT_STATE_DIR}"
    )
    migrate.add_argument("--node-id", help="env ANNA_NODE_ID or NODE_ID; default: state's node_id")
    migrate.add_argument(
        "--audit-log", type=Path, help=f"env ANNA_AUDIT_LOG, default {DEFAULT_AUDIT_LOG}"
    )
    migrate.add_argument(
        "--dry-run", action="store_true", help="say what would happen, change nothing"
    )
    migrate.set_defaults(handler=run_migrate)

    audit = commands.add_parser("audit", help="work on the audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    verify = audit_commands.add_parser(
        "verify",
        help="check the audit log's hash chain and audit_id order",
        description="Exit 0 when every line chains, audit_id strictly increases and the log "
        "reaches the chain head anchored beside it (<log>.head), else 1 naming the first bad "
        "or missing line.",
    )
    verify.add_argument(
        "--audit-log", type=Path, help=f"env ANNA_AUDIT_LOG, default {DEFAULT_AUDIT_LOG}"
    )
    verify.add_argument(
        "--anchor", type=Path, metavar="FILE", help="the chain-head anchor (default <log>.head)"
    )
    verify.add_argument("--json", action="store_true", help="machine-readable result")
    verify.set_defaults(handler=run_audit_verify)


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or os.environ.get("ANNA_STATE_DIR") or DEFAULT_STATE_DIR)


def _audit_log(args: argparse.Namespace) -> Path:
    return Path(args.audit_log or os.environ.get("ANNA_AUDIT_LOG") or DEFAULT_AUDIT_LOG)


def _fail(message: str, code: int) -> int:
    print(f"annactl: {message}", file=sys.stderr)
    return code


def _node_id_in_state(state_dir: Path) -> str | None:
    try:
        state = json.loads((state_dir / "state.json").read_bytes())
    except (OSError, ValueError):
        return None
    node_id = state.get("node_id") if isinstance(state, dict) else None
    return node_id if isinstance(node_id, str) else None


class _StepFormatter(logging.Formatter):
    """`INFO Saving v2 state`; messages that already name their level print as they are."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if message.startswith(f"{record.levelname}:"):
            return message
        return f"{record.levelname} {message}"


def run_migrate(args: argparse.Namespace) -> int:
    from .. import failpoints
    from .._exceptions import AnnaError, ConfigError, MigrationRolledBack, StateError
    from ..audit import AuditLog
    from ..state.lock import StateDirLock
    from ..state.migration import MigrationOutcome, migrate_state, node_allocator, plan_migration

    state_dir, audit_path = _state_dir(args), _audit_log(args)
    try:
        failpoints.load_from_env(os.environ.get("ANNA_FAILPOINTS"))
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    if not state_dir.is_dir():
        return _fail(f"state dir {state_dir} does not exist", EXIT_CONFIG)
    node_id = (
        args.node_id
        or os.environ.get("ANNA_NODE_ID")
        or os.environ.get("NODE_ID")
        or _node_id_in_state(state_dir)
    )
    if not node_id:
        return _fail("a node id is needed: pass --node-id or set ANNA_NODE_ID", EXIT_USAGE)

    package_logger = logging.getLogger("anna_trio")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StepFormatter())
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    log = logging.getLogger("anna_trio.migration")
    try:
        if args.dry_run:
            print(
                f"dry run: {plan_migration(state_dir, node_id=node_id).description}; nothing changed"
            )
            return EXIT_OK
        with StateDirLock(state_dir):
            ids = node_allocator(state_dir)
            audit = AuditLog.open(audit_path, node_id, ids)
            try:
                outcome = migrate_state(
                    state_dir, node_id=node_id, audit=audit, metrics=None, log=log
                )
            finally:
                audit.close()
                ids.release()
    except StateError as exc:
        return _fail(f"{exc} (nothing was modified)", EXIT_DATA)
    except MigrationRolledBack as exc:
        return _fail(str(exc), EXIT_CONFIG)
    except AnnaError as exc:
        return _fail(str(exc), exc.exit_code)
    except OSError as exc:
        return _fail(f"state migration failed: {exc}", EXIT_BAD)
    finally:
        package_logger.removeHandler(handler)
    messages = {
        MigrationOutcome.MIGRATED: f"{state_dir}/state.json migrated to schema v2",
        MigrationOutcome.ALREADY_V2: f"{state_dir}/state.json is already schema v2; nothing to do",
        MigrationOutcome.CREATED_FRESH: f"no state found: created a fresh v2 {state_dir}/state.json",
    }
    print(messages[outcome])
    return EXIT_OK


def run_audit_verify(args: argparse.Namespace) -> int:
    from .._exceptions import StateError
    from ..audit import verify_audit_log

    path = _audit_log(args)
    try:
        result = verify_audit_log(path, args.anchor)
    except OSError as exc:
        return _fail(f"cannot read audit log {path}: {exc.strerror}", EXIT_BAD)
    except StateError as exc:
        return _fail(str(exc), EXIT_BAD)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": result.ok,
                    "entries": result.entries,
                    "first_audit_id": result.first_audit_id,
                    "last_audit_id": result.last_audit_id,
                    "first_bad_line": result.first_bad_line,
                    "reason": result.reason,
                }
            )
        )
    elif result.ok and result.entries:
        print(
            f"OK: {result.entries} entries, audit_id "
            f"{result.first_audit_id}..{result.last_audit_id}, {result.reason}"
        )
    elif result.ok:
        print(f"OK: 0 entries, {result.reason}")
    else:
        print(
            f"BAD: {path} line {result.first_bad_line}: {result.reason} "
            f"({result.entries} entries before it verified)"
        )
    return EXIT_OK if result.ok else EXIT_BAD
