"""The console's audit chain check: off the event loop, cached, resumed while the log
only grows, and never holding a page longer than PAGE_WAIT."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from anna_trio.audit import AuditIdAllocator, AuditLog, AuditVerification, verify_audit_log
from anna_trio.console import auditcheck
from anna_trio.console.auditcheck import PAGE_WAIT, AuditChainCheck


def append(path: Path, count: int) -> None:
    log = AuditLog.open(path, "node_001", AuditIdAllocator())
    for n in range(count):
        log.append("daemon_start", {"n": n})
    log.close()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[AuditVerification | None]:
    """The `resume` argument of every verification the check runs."""
    seen: list[AuditVerification | None] = []
    real = verify_audit_log

    def recording(path: Path, *, resume: AuditVerification | None = None) -> AuditVerification:
        seen.append(resume)
        return real(path, resume=resume)

    monkeypatch.setattr(auditcheck, "verify_audit_log", recording)
    return seen


async def check_now(check: AuditChainCheck) -> auditcheck.AuditStatus:
    async with trio.open_nursery() as nursery:
        status = await check.status(nursery)
    return status


async def test_an_unchanged_log_is_not_read_again(
    tmp_path: Path, calls: list[AuditVerification | None]
) -> None:
    """The second page view of an unchanged log reuses the first check."""
    path = tmp_path / "audit.jsonl"
    append(path, 3)
    check = AuditChainCheck(path)
    first = await check_now(check)
    assert first.result is not None and (first.result.ok, first.result.entries) == (True, 3)
    assert (await check_now(check)).result == first.result
    assert calls == [None]


async def test_a_grown_log_is_checked_from_where_the_last_check_ended(
    tmp_path: Path, calls: list[AuditVerification | None]
) -> None:
    """Appended entries are verified by resuming; the result matches a full check."""
    path = tmp_path / "audit.jsonl"
    append(path, 3)
    check = AuditChainCheck(path)
    first = (await check_now(check)).result
    append(path, 2)
    second = (await check_now(check)).result
    assert calls == [None, first]
    assert second == verify_audit_log(path) and second is not None
    assert (second.ok, second.entries) == (True, 5)


@pytest.mark.parametrize("change", ["replaced", "truncated"])
async def test_a_replaced_or_shorter_log_is_checked_in_full(
    tmp_path: Path, calls: list[AuditVerification | None], change: str
) -> None:
    """Another file at the path (rotation, restore) or a shorter one: a full check, which
    for the shorter one finds it cut short of its anchor."""
    path = tmp_path / "audit.jsonl"
    append(path, 3)
    check = AuditChainCheck(path)
    await check_now(check)
    if change == "replaced":
        other = tmp_path / "other.jsonl"
        other.write_bytes(path.read_bytes().replace(b'"n":0', b'"n":9'))
        os.replace(other, path)
    else:
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(lines[0])
    status = await check_now(check)
    assert calls == [None, None]
    assert status.result is not None
    if change == "replaced":
        assert (status.result.ok, status.result.first_bad_line) == (False, 1)
    else:  # the anchor beside the log still names the third entry: a cut is no good log
        assert (status.result.ok, status.result.first_bad_line) == (False, 2)
        assert "removed from the end" in status.result.reason


async def test_an_unreadable_log_is_an_error_not_an_exception(tmp_path: Path) -> None:
    """A missing log is reported (and the next check starts over)."""
    check = AuditChainCheck(tmp_path / "missing.jsonl")
    status = await check_now(check)
    assert status.result is None and status.error is not None
    assert "cannot read" in status.error


async def test_a_slow_check_holds_a_page_no_longer_than_page_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """While a (huge) log is being verified on its thread, pages wait PAGE_WAIT, then
    show the last result marked as checking; concurrent pages share the one check."""
    path = tmp_path / "audit.jsonl"
    append(path, 2)
    release, began = threading.Event(), threading.Event()
    started: list[Any] = []
    real = verify_audit_log

    def slow(path: Path, *, resume: AuditVerification | None = None) -> AuditVerification:
        started.append(resume)
        began.set()
        release.wait(10)
        return real(path, resume=resume)

    monkeypatch.setattr(auditcheck, "verify_audit_log", slow)
    check = AuditChainCheck(path)
    async with trio.open_nursery() as nursery:
        begin = trio.current_time()
        pages = [await check.status(nursery) for _ in range(2)]
        assert trio.current_time() - begin == pytest.approx(2 * PAGE_WAIT)
        assert all(p.checking and p.result is None for p in pages)
        await trio.to_thread.run_sync(began.wait, 10)  # the thread may start after the pages
        assert len(started) == 1
        release.set()
    # The slow check has ended with the nursery; its result is what the next page shows
    # (whether or not the quick recheck it starts ends before the autojumping clock).
    done = await check_now(check)
    assert done.error is None and done.result is not None and done.result.entries == 2
