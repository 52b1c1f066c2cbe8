"""Power loss (issue 13): nothing a node acknowledged or signed is lost when it loses power.

Each case cuts one node's power at one crash point and lists every promise broken
(scenario.py says how). The crash points are the failpoints on durable steps, armed
with `exit`, plus `kill` (kill -9 at a seeded moment under load); a failpoint added
to `failpoints.NAMES` under `store.`, `audit.` or `rpc.` joins them by itself.

ANNA_POWERLOSS_SEED (default "1,2,3", comma-separated) and ANNA_POWERLOSS_CRASH (default
every crash point, comma-separated) choose the cases; a failure prints the line that
replays it, e.g. `ANNA_POWERLOSS_SEED=2 ANNA_POWERLOSS_CRASH=store.after_commit nox -s powerloss`.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import trio
from scenario import KILL, LOSSES, RESTART, Case, migration_crash, operational_crash

from anna_trio import failpoints
from anna_trio.durable import UNSAFE_ENV

pytestmark = pytest.mark.powerloss

OPERATIONAL = (
    *(
        name
        for name in failpoints.NAMES
        if name.startswith(("store.", "audit.", "rpc.")) or name == "observation.before_send"
    ),
    KILL,
)
MIGRATION = tuple(name for name in failpoints.NAMES if name.startswith("migrate."))


def _chosen() -> tuple[list[int], set[str]]:
    seeds = [int(s) for s in os.environ.get("ANNA_POWERLOSS_SEED", "1,2,3").split(",") if s]
    named = {c.strip() for c in os.environ.get("ANNA_POWERLOSS_CRASH", "").split(",") if c}
    unknown = named - {*OPERATIONAL, *MIGRATION}
    if unknown:
        raise pytest.UsageError(
            f"ANNA_POWERLOSS_CRASH: unknown {sorted(unknown)}; "
            f"known: {', '.join((*OPERATIONAL, *MIGRATION))}"
        )
    return seeds, named or {*OPERATIONAL, *MIGRATION}


SEEDS, CRASHES = _chosen()


def cases(crash_points: tuple[str, ...]) -> list[Case]:
    return [Case(seed, crash) for seed in SEEDS for crash in crash_points if crash in CRASHES]


@pytest.mark.parametrize("case", cases(OPERATIONAL), ids=str)
def test_power_cut_at_crash_point(case: Case, lazyfs_binary: Path, tmp_path: Path) -> None:
    """A 3-node cluster under load; one node loses power at the crash point and comes back
    with everything it acknowledged, its own observations unchanged, nobody flagged, no
    audit_id reused and an audit log that verifies (and a truncated copy that does not)."""
    findings = trio.run(operational_crash, case, lazyfs_binary, tmp_path)
    if findings:
        pytest.fail(findings.report(), pytrace=False)


@pytest.mark.parametrize("case", cases(MIGRATION), ids=str)
def test_power_cut_during_migration(case: Case, lazyfs_binary: Path, tmp_path: Path) -> None:
    """The v1 → v2 migration dies at the failpoint and the power goes: the next start finds
    the untouched v1 or a complete v2, and the audit log records the migration once."""
    findings = trio.run(migration_crash, case, lazyfs_binary, tmp_path)
    if findings:
        pytest.fail(findings.report(), pytrace=False)


def test_suite_reports_the_loss_when_fsync_is_off(lazyfs_binary: Path, tmp_path: Path) -> None:
    """With the victim's WAL fsync switched off (ANNA_UNSAFE_NO_FSYNC=1) the kill -9
    scenario of every seed brings the node back and reports acknowledged data lost, and
    the seeds between them fire every loss check: a suite that passes then proves nothing.

    A node that does not come back counts for nothing here: the loss checks never ran."""
    unsafe = partial(operational_crash, victim_env={UNSAFE_ENV: "1"})
    runs = []
    for seed in SEEDS:
        directory = tmp_path / f"seed{seed}"
        directory.mkdir()
        runs.append(trio.run(unsafe, Case(seed, KILL), lazyfs_binary, directory))
    report = "\n".join(findings.report() for findings in runs)
    for findings in runs:
        if RESTART in findings.checks():
            pytest.fail(f"the victim did not come back, no loss checked:\n{report}", pytrace=False)
        if not findings.checks() & LOSSES:
            pytest.fail(f"with fsync off no loss was reported:\n{report}", pytrace=False)
    silent = LOSSES - set().union(*(findings.checks() for findings in runs))
    if silent:
        pytest.fail(f"with fsync off these never fired: {sorted(silent)}\n{report}", pytrace=False)
