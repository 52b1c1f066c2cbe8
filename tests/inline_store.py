"""The store with its fsyncs and checkpoints on the Trio thread, for tests on the
autojump clock.

A worker thread in flight looks idle to MockClock(autojump_threshold=0), which then
jumps virtual time past every pending timer while the disk works (a 200 ms wait for an
own observation would expire during a checkpoint). Same SQL, same group commit.
"""

from __future__ import annotations

from pathlib import Path

from anna_trio.store import FileDisk, Store


class InlineFileDisk(FileDisk):
    async def sync(self) -> None:
        self.sync_now()

    async def checkpoint(self) -> None:
        self.checkpoint_now()


class InlineStore(Store):
    def __init__(self, path: Path) -> None:
        super().__init__(InlineFileDisk(path))
