"""The audit log's length and whether its chain verifies, for the console.

A page view never verifies the log on the event loop, nor the whole of it every time:
the check runs on a worker thread, one at a time, and while the file is the same file
and has only grown, it resumes from where the last good check ended (`verify_audit_log`
with `resume`), so a long-lived node reads each line once. A page waits for a running
check at most PAGE_WAIT and otherwise shows the last result, marked as being checked.
`annactl audit verify` remains the full check.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import attrs
import trio

from ..audit import AuditVerification, verify_audit_log

PAGE_WAIT = 1.0


@attrs.frozen
class _Seen:
    """Which file was checked, and how long it was: (device, inode, size)."""

    device: int
    inode: int
    size: int


@attrs.frozen
class AuditStatus:
    """What the console shows: the last result (None before the first), whether a
    check is still running, and why the log could not be read, if it could not."""

    result: AuditVerification | None
    checking: bool
    error: str | None = None


def _check(
    path: Path, previous: AuditVerification | None, seen: _Seen | None
) -> tuple[AuditVerification, _Seen]:
    """Worker thread: the same file, no longer than before → resume; unchanged → reuse."""
    stat = os.stat(path)
    now = _Seen(stat.st_dev, stat.st_ino, stat.st_size)
    if previous is not None and seen == now:
        return previous, now
    grown = (
        previous is not None
        and seen is not None
        and previous.ok
        and (seen.device, seen.inode) == (now.device, now.inode)
        and now.size >= previous.verified_bytes
    )
    return verify_audit_log(path, resume=previous if grown else None), now


class AuditChainCheck:
    """The cached, incremental check of one audit log."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._result: AuditVerification | None = None
        self._seen: _Seen | None = None
        self._error: str | None = None
        self._running: trio.Event | None = None

    async def status(self, nursery: trio.Nursery) -> AuditStatus:
        """Start a check in `nursery` unless one is running; wait for it up to PAGE_WAIT."""
        if self._running is None:
            self._running = trio.Event()
            nursery.start_soon(self._run, self._running)
        with trio.move_on_after(PAGE_WAIT):
            await self._running.wait()
        return AuditStatus(self._result, self._running is not None, self._error)

    async def _run(self, done: trio.Event) -> None:
        try:
            self._result, self._seen = await trio.to_thread.run_sync(
                partial(_check, self._path, self._result, self._seen)
            )
            self._error = None
        except OSError as exc:
            self._error = f"cannot read {self._path}: {exc.strerror or exc}"
            self._result, self._seen = None, None
        finally:
            self._running = None
            done.set()
