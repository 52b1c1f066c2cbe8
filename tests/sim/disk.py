"""The seeded disk layer under each simulated node's store (the store's `Disk` seam).

`Media` is what a node's database file holds across its processes: in-memory SQLite
plus the journal of every committed transaction, and how far the journal was synced.
A kill -9 keeps all of it (committed transactions sit in the page cache); a power cut
keeps the synced transactions and a seeded prefix of the others (a WAL keeps a valid
prefix of its frames) and rebuilds the database from them alone.

`MountedDisk` is one process's view of it: `sync` runs on the Trio thread after a
seeded latency (no worker thread, so the mock clock sees it finish), and once the
process is killed nothing it writes or syncs reaches the media.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterable

import trio

from anna_trio.store import Statement, create_schema

from .process import Process

_EMPTY = sqlite3.connect(":memory:", isolation_level=None)
create_schema(_EMPTY)


def _open_database() -> sqlite3.Connection:
    """A new in-memory database with the store's tables (copied from an empty one
    made once: creating them costs about a millisecond)."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    _EMPTY.backup(db)
    return db


class Media:
    """A node's database as the disk holds it; survives its processes."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._journal: list[tuple[Statement, ...]] = []
        self._synced = 0
        self._committed = trio.Event()
        self.db = _open_database()

    @property
    def committed(self) -> int:
        """Transactions committed so far (the journal's length)."""
        return len(self._journal)

    @property
    def synced(self) -> int:
        return self._synced

    def commit(self, statements: Iterable[Statement]) -> None:
        """One transaction, in the database and the journal; rolled back on any error."""
        batch = tuple(statements)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in batch:
                self.db.execute(sql, params)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self._journal.append(batch)
        self._committed.set()

    async def wait_unsynced(self) -> None:
        """Return once a committed transaction is not yet synced (a power cut now loses
        it, or part of the journal with it)."""
        while self._synced == len(self._journal):
            self._committed = trio.Event()
            await self._committed.wait()

    def sync_through(self, committed: int) -> None:
        """The first `committed` transactions are durable."""
        self._synced = max(self._synced, committed)

    def power_cut(self) -> int:
        """Lose what was not synced, all but a seeded prefix of it; returns how many
        transactions were lost. Call it only once the process using it has ended."""
        kept = self._synced + self._rng.randint(0, len(self._journal) - self._synced)
        lost = len(self._journal) - kept
        del self._journal[kept:]
        self._synced = kept
        self.db.close()
        self.db = _open_database()
        for batch in self._journal:
            for sql, params in batch:
                self.db.execute(sql, params)
        return lost

    def close(self) -> None:
        self.db.close()


class MountedDisk:
    """The store's Disk for one process of a node."""

    def __init__(
        self, media: Media, process: Process, rng: random.Random, *, max_latency: float
    ) -> None:
        self._media = media
        self._process = process
        self._rng = rng
        self._max_latency = max_latency
        self.syncs = 0

    @property
    def db(self) -> sqlite3.Connection:
        return self._media.db

    def write(self, statements: Iterable[Statement]) -> None:
        if self._process.alive:
            self._media.commit(statements)

    async def sync(self) -> None:
        """Durable after a seeded fsync latency, on the Trio thread; a kill during the
        wait leaves the transactions committed but not synced. Not cancellable, as
        FileDisk's fsync on a worker thread is not (abandon_on_cancel=False)."""
        committed = self._media.committed
        latency = self._rng.uniform(0.0, self._max_latency)
        if latency:
            with trio.CancelScope(shield=True):
                await trio.sleep(latency)
        if self._process.alive:
            self._media.sync_through(committed)
            self.syncs += 1

    async def checkpoint(self) -> None:
        """Nothing to copy: the journal is the database."""

    def close(self) -> None:
        """The media outlives the process."""
