"""The store's writer: group commits on the Trio thread, fsyncs and checkpoints beside it."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from anna_trio import failpoints, store
from anna_trio.store import FileDisk, Store
from inline_store import InlineFileDisk, InlineStore


def round_row(n: int) -> store.Statement:
    return Store.round_stmt(f"round_{n:04d}", 24, 0.0)


def wal_bytes(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def rounds_in_database_file(path: Path) -> int:
    """Rows the main database file holds, ignoring the WAL: what checkpoints moved there."""
    db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
    except sqlite3.OperationalError:  # not even the schema has been checkpointed yet
        return 0
    finally:
        db.close()


async def test_commit_returns_after_the_wal_fsync_which_runs_on_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: the transaction on the Trio thread, then one fsync of the WAL on a
    worker thread for the whole batch; no waiter is released before it."""
    path = tmp_path / "node.db"
    db = Store.on_file(path)  # the real writer, not the test double
    wal = os.stat(f"{path}-wal")
    main = threading.current_thread()
    synced: list[tuple[bool, int]] = []  # (on a worker thread?, rounds committed then)
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == (wal.st_dev, wal.st_ino):
            count = db._db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
            synced.append((threading.current_thread() is not main, count))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    released: list[int] = []

    async def commit(n: int) -> None:
        await db.commit([round_row(n)])
        released.append(len(synced))

    async with trio.open_nursery() as nursery:
        await nursery.start(db.run)
        async with trio.open_nursery() as writers:
            for n in range(5):
                writers.start_soon(commit, n)
        nursery.cancel_scope.cancel()
    db.close()
    assert synced == [(True, 5)]  # one fsync covered the five queued commits
    assert released == [1] * 5


class GatedDisk(InlineFileDisk):
    """A disk whose fsyncs wait until the test lets each one finish."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.syncs_begun = 0
        self.finish = [trio.Event() for _ in range(3)]
        self.committed_at_sync: list[int] = []

    async def sync(self) -> None:
        self.syncs_begun += 1
        self.committed_at_sync.append(self.db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
        await self.finish[self.syncs_begun - 1].wait()
        await super().sync()


async def test_commits_that_queue_during_an_fsync_share_the_next_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Group commit as etcd does it: while one fsync runs, every commit that arrives
    waits in the queue, and one transaction and one fsync then cover all of them; none
    is released before the fsync that covers it."""
    disk = GatedDisk(tmp_path / "node.db")
    db = Store(disk)
    released: dict[int, int] = {}  # commit -> syncs finished when it returned

    async def commit(n: int) -> None:
        await db.commit([round_row(n)])
        released[n] = sum(event.is_set() for event in disk.finish)

    async with trio.open_nursery() as nursery:
        await nursery.start(db.run)
        nursery.start_soon(commit, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert disk.syncs_begun == 1  # commit 0's fsync is running
        for n in range(1, 6):
            nursery.start_soon(commit, n)
        await trio.testing.wait_all_tasks_blocked()
        assert disk.syncs_begun == 1 and released == {}  # the five wait their turn
        disk.finish[0].set()
        await trio.testing.wait_all_tasks_blocked()
        assert released == {0: 1} and disk.syncs_begun == 2
        disk.finish[1].set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    db.close()
    assert released == {n: 2 if n else 1 for n in range(6)}
    assert disk.committed_at_sync == [1, 6]  # the second fsync covered the five at once


async def test_checkpoint_every_so_many_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """SQLite's auto-checkpoint is off; the writer checkpoints after CHECKPOINT_EVERY commits."""
    monkeypatch.setattr(store, "CHECKPOINT_EVERY", 5)
    path = tmp_path / "node.db"
    db = InlineStore(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(db.run)
        for n in range(4):
            await db.commit([round_row(n)])
        await trio.testing.wait_all_tasks_blocked()
        assert rounds_in_database_file(path) == 0  # all still in the WAL
        await db.commit([round_row(4)])
        await trio.testing.wait_all_tasks_blocked()
        assert rounds_in_database_file(path) == 5
        for n in range(5, 9):
            await db.commit([round_row(n)])
        await trio.testing.wait_all_tasks_blocked()
        assert rounds_in_database_file(path) == 5
        nursery.cancel_scope.cancel()
    db.close()
    assert rounds_in_database_file(path) == 9  # closing the last connection checkpoints


def test_checkpoint_now_copies_the_wal_and_empties_it(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    db = Store.on_file(path)
    db.write_now([round_row(1), round_row(2)])
    assert wal_bytes(path) > 0
    assert isinstance(db.disk, FileDisk)
    assert db.disk.checkpoint_now() == (0, 0, 0)  # TRUNCATE reports the emptied log
    assert rounds_in_database_file(path) == 2
    assert wal_bytes(path) == 0
    db.close()


async def test_the_wal_stays_small_under_a_stream_of_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real writer, its checkpoints on a worker thread: commits wait for a running
    checkpoint, so each one copies everything and the WAL never grows past a few
    checkpoints' worth (one racing the writer never caught up: 130 MB in a run)."""
    monkeypatch.setattr(store, "CHECKPOINT_EVERY", 10)
    checkpoint = FileDisk.checkpoint_now

    def slow_checkpoint(self: FileDisk) -> tuple[int, int, int]:
        time.sleep(0.005)  # on the worker thread: a disk slower than the writer
        return checkpoint(self)

    monkeypatch.setattr(FileDisk, "checkpoint_now", slow_checkpoint)
    path = tmp_path / "node.db"
    db = Store.on_file(path)
    largest = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(db.run)

        async def writer(first: int) -> None:
            nonlocal largest
            for n in range(first, first + 300):
                await db.commit([round_row(n)])
                largest = max(largest, wal_bytes(path))

        async with trio.open_nursery() as writers:
            for first in range(0, 1200, 300):
                writers.start_soon(writer, first)
        nursery.cancel_scope.cancel()
    assert db.load(2000).rounds[-1][0] == "round_1199"
    db.close()
    assert 0 < largest < 400 * 1024  # ~10 commits of 3-4 pages each


async def test_a_sleeping_commit_failpoint_stalls_the_writer_not_the_loop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """`store.before_commit=sleep(MS)` makes a slow disk: commits wait, other tasks run."""
    db = InlineStore(tmp_path / "node.db")
    failpoints.arm("store.before_commit", "sleep(500)")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(db.run)
            begun = trio.current_time()
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await trio.sleep(0.1)
                    ticks += 1

            nursery.start_soon(ticker)
            await db.commit([round_row(1)])
            assert trio.current_time() - begun == pytest.approx(0.5)
            assert ticks >= 4
            nursery.cancel_scope.cancel()
    finally:
        failpoints.disarm("store.before_commit")
    db.close()


async def test_a_cancelled_writer_commits_what_is_queued_and_late_committers_still_commit(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Shutdown cancels the writer while shielded steps of the node still commit: the
    queued rows go in one last transaction, and a commit made after that on its own."""
    db = InlineStore(tmp_path / "node.db")
    async with trio.open_nursery() as nursery:
        await nursery.start(db.run)
        db._pending.append(round_row(1))  # queued, the writer not yet woken
        nursery.cancel_scope.cancel()
    with trio.CancelScope(shield=True):
        await db.commit([round_row(2)])
    assert [r for r, _ in db.load(10).rounds] == ["round_0001", "round_0002"]
    db.close()


async def test_a_failed_fsync_stops_the_writer_and_every_committer_hears_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    class BrokenDisk(InlineFileDisk):
        async def sync(self) -> None:
            raise OSError(5, "I/O error")

    db = Store(BrokenDisk(tmp_path / "node.db"))
    errors: list[BaseException] = []

    async def committer(n: int) -> None:
        try:
            await db.commit([round_row(n)])
        except trio.ClosedResourceError as exc:
            errors.append(exc)

    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="I/O error")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(committer, 1)
            nursery.start_soon(committer, 2)
            await db.run()
    with pytest.raises(trio.ClosedResourceError):
        await db.commit([round_row(3)])
    assert len(errors) == 2
    db.close()
