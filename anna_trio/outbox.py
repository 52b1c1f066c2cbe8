"""What this node has to tell its peers, held until each peer's link sends it.

The daemon makes the outbox from the validator set and hands it to the node (which
broadcasts into it) and to the peer supervisor (whose links drain it), so neither is
installed on the other after construction. A broadcast made before the links run — a
restarted node re-sending its restored observations — waits in the queues and goes out
as soon as they do; a link restarted by a reload finds its queue where it left it.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Collection, Iterable
from typing import Any

import trio

MAX_QUEUE = 10_000
KINDS = ("rounds", "evidence", "observations")

Item = tuple[str, bytes]  # (kind, the item's JSON, encoded once for every peer)


class PeerQueue:
    """One peer's items, bounded: when full the oldest goes (anti-entropy repairs it)."""

    def __init__(self) -> None:
        self._items: deque[Item] = deque(maxlen=MAX_QUEUE)
        self._queued = trio.Event()
        self._pull = trio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, kind: str, encoded: bytes) -> None:
        """Never blocks."""
        self._items.append((kind, encoded))
        self._queued.set()

    async def wait_queued(self) -> None:
        """Return once an item is queued."""
        while not self._items:
            await self._queued.wait()
            self._queued = trio.Event()

    def take_batch(self, max_bytes: int) -> list[Item]:
        """The oldest items that fit in `max_bytes` (at least one)."""
        batch: list[Item] = []
        size = 0
        while self._items:
            kind, encoded = self._items[0]
            if size and size + len(encoded) + 1 > max_bytes:
                break
            self._items.popleft()
            batch.append((kind, encoded))
            size += len(encoded) + 1
        return batch

    def put_back(self, batch: list[Item]) -> None:
        """A batch the peer did not take goes back to the front, as room allows."""
        for item in reversed(batch):
            if len(self._items) < MAX_QUEUE:
                self._items.appendleft(item)

    def request_pull(self) -> None:
        self._pull.set()

    async def wait_pull_request(self) -> None:
        """Return at the next `request_pull` (one made before this call counts)."""
        await self._pull.wait()
        self._pull = trio.Event()


class PeerOutbox:
    """One PeerQueue per peer of the current validator set."""

    def __init__(self, peer_ids: Iterable[str]) -> None:
        self._queues: dict[str, PeerQueue] = {}
        self.set_peers(peer_ids)

    def set_peers(self, peer_ids: Iterable[str]) -> None:
        """A new validator set (a reload): queues for new peers, none for removed ones."""
        wanted = set(peer_ids)
        for gone in self._queues.keys() - wanted:
            del self._queues[gone]
        for peer_id in wanted:
            self._queues.setdefault(peer_id, PeerQueue())

    def queue(self, peer_id: str) -> PeerQueue:
        return self._queues[peer_id]

    def broadcast(self, kind: str, item: dict[str, Any], exclude: Collection[str] = ()) -> None:
        encoded = json.dumps(item, separators=(",", ":")).encode()
        for peer_id, queue in self._queues.items():
            if peer_id not in exclude:
                queue.put(kind, encoded)

    def pull_soon(self) -> None:
        for queue in self._queues.values():
            queue.request_pull()
