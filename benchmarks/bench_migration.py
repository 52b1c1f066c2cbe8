"""State v1 → v2 migration latency (SPEC §5 target: median ≤ 5 ms for a 10 KB v1 state).

Each run migrates a fresh ~10 KB v1 state.json in its own temp dir, in process, with
every fsync the real migration does (backup, checksum, v2, two directory syncs, the
durable audit entry). Only `migrate_state` is timed; its CPU time is reported beside the
wall time because fsync latency depends on how busy the disk is. Prints one JSON document.

    python benchmarks/bench_migration.py [--runs 200] [--dir /var/lib/anna-bench]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anna_trio.audit import AuditLog

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike
from anna_trio.state.migration import MigrationOutcome, migrate_state, node_allocator

TARGET_MEDIAN_MS = 5.0
STATE_BYTES = 10 * 1024


def v1_state(size: int = STATE_BYTES) -> bytes:
    """A mirror-audit-like v1 state padded with recent_audits to about ``size`` bytes."""
    state: dict[str, Any] = {
        "system_state": "configured",
        "schema_version": 1,
        "last_boot_time": "2025-11-01T00:00:00Z",
        "configuration_hash": "abc123",
        "last_audit_id": 1000,
        "total_audits": 0,
        "recent_audits": [],
    }
    while len(json.dumps(state, indent=1)) < size:
        index = len(state["recent_audits"])
        state["recent_audits"].append(
            {"audit_id": index, "tis": 0.85, "forecast_hash": f"sha256:{index:064x}"}
        )
        state["total_audits"] = index + 1
    return json.dumps(state, indent=1).encode()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, q in 0..100."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


class FsyncCounter:
    """Counts os.fsync calls (the migration's durability cost) without changing them."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = os.fsync

    def __call__(self, fd: FileDescriptorLike) -> None:
        self.calls += 1
        self.real(fd)


def run_once(parent: Path, raw: bytes, log: logging.Logger) -> tuple[float, float]:
    """One migration in a fresh dir: (wall ms, CPU ms)."""
    with tempfile.TemporaryDirectory(dir=parent) as name:
        state_dir = Path(name)
        (state_dir / "state.json").write_bytes(raw)
        ids = node_allocator(state_dir)
        audit = AuditLog.open(state_dir / "audit.jsonl", "node_001", ids)
        try:
            started, cpu_started = time.perf_counter(), time.process_time()
            outcome = migrate_state(
                state_dir, node_id="node_001", audit=audit, metrics=None, log=log
            )
            wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        finally:
            audit.close()
        if outcome is not MigrationOutcome.MIGRATED:
            raise RuntimeError(f"expected a migration, got {outcome}")
        return wall * 1000, cpu * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="filesystem to test"
    )
    args = parser.parse_args()
    log = logging.getLogger("bench_migration")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    raw = v1_state()
    run_once(args.dir, raw, log)  # warm imports and caches
    counter = FsyncCounter()
    os.fsync = counter
    try:
        runs = [run_once(args.dir, raw, log) for _ in range(args.runs)]
    finally:
        os.fsync = counter.real
    walls = [wall for wall, _ in runs]
    median = statistics.median(walls)
    result = {
        "benchmark": "state_migration_v1_to_v2",
        "state_bytes": len(raw),
        "runs": args.runs,
        "directory": str(args.dir),
        "fsyncs_per_run": counter.calls / args.runs,
        "median_ms": round(median, 3),
        "p90_ms": round(percentile(walls, 90), 3),
        "p99_ms": round(percentile(walls, 99), 3),
        "max_ms": round(max(walls), 3),
        "cpu_median_ms": round(statistics.median(cpu for _, cpu in runs), 3),
        "target_median_ms": TARGET_MEDIAN_MS,
        "meets_target": median <= TARGET_MEDIAN_MS,
    }
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
