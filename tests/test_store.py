"""The store's writer: group commits on the Trio thread, checkpoints beside it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing

from anna_trio import failpoints, store
from anna_trio.store import Store
from inline_store import InlineStore


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def round_row(n: int) -> store.Statement:
    return Store.round_stmt(f"round_{n:04d}", 24, 0.0)


def rounds_in_database_file(path: Path) -> int:
    """Rows the main database file holds, ignoring the WAL: what checkpoints moved there."""
    db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
    except sqlite3.OperationalError:  # not even the schema has been checkpointed yet
        return 0
    finally:
        db.close()


async def test_commits_never_leave_the_trio_thread(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The autojump clock jumps to the next deadline whenever the run loop waits for a
    worker thread: 200 commits inside a 1 s (virtual) budget only finish if none does."""
    db = Store(tmp_path / "node.db")  # the real writer, not the test double
    async with trio.open_nursery() as nursery:
        await nursery.start(db.run)
        with trio.fail_after(1):
            for n in range(200):
                await db.commit([round_row(n)])
        nursery.cancel_scope.cancel()
    assert db.load(1000).rounds[-1] == ("round_0199", 24)
    db.close()


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


def test_checkpoint_now_copies_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    db = Store(path)
    db.write_now([round_row(1), round_row(2)])
    busy, frames, copied = db.checkpoint_now()
    assert busy == 0 and frames > 0 and copied == frames
    assert rounds_in_database_file(path) == 2
    db.close()


async def test_a_sleeping_commit_failpoint_stalls_the_writer_not_the_loop(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """`store.before_commit=sleep(MS)` makes a slow disk: commits wait, other tasks run."""
    db = Store(tmp_path / "node.db")
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
