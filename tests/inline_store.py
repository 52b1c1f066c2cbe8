"""The store with its writer on the Trio thread, for tests on the autojump clock.

A worker thread in flight looks idle to MockClock(autojump_threshold=0), which then
jumps virtual time past every pending timer while SQLite commits (a 200 ms wait for an
own observation would expire during a 0.2 ms commit). Same SQL, same group commit.
"""

from __future__ import annotations

from anna_trio.store import Statement, Store


class InlineStore(Store):
    async def _write(self, batch: list[Statement]) -> None:
        self._write_batch(batch)
