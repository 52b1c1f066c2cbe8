"""The seams the node and its peer links are built on, as Protocols.

The daemon fills them with the real things: the system clock, an OS-seeded random
source, HTTP/1.1 over mTLS to each peer, SQLite on disk with fsync on a worker thread,
the configured observer. Tests and the cluster simulator (tests/sim/) fill them with
fakes that type-check as they are, so a whole cluster runs in one Trio process on a
mock clock, deterministically.

The store's seam is one level down, `store.Disk` (what the database lives on): fakes and
the simulator keep the real `Store`, whose batching, group commit and recovery are what
they exercise, over a disk of their own (`tests/inline_store.py`, `tests/sim/disk.py`).

Time inside a process is Trio's clock (``trio.current_time()``), which a MockClock
already replaces; `Clock` is the one reading Trio cannot fake: the wall clock, which
goes into signed timestamps, round ids and status times.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Protocol

from .observer import Measurement
from .transport.client import Response


class Clock(Protocol):
    """The wall clock."""

    def wall(self) -> float:
        """Seconds since the Unix epoch."""
        ...


class SystemClock:
    def wall(self) -> float:
        return time.time()


class RandomSource(Protocol):
    """Randomness the node's decisions draw on (backoff jitter, synthetic TIS jitter);
    `random.Random` is one."""

    def uniform(self, a: float, b: float) -> float: ...


def system_random() -> RandomSource:
    """An OS-seeded source, one per user so none shares another's sequence."""
    return random.Random()


class Outbox(Protocol):
    """Where the node leaves what its peers must hear (`outbox.PeerOutbox`)."""

    def broadcast(self, kind: str, item: dict[str, Any], exclude: Collection[str] = ()) -> None: ...

    def pull_soon(self) -> None:
        """Ask every peer link for an anti-entropy pull now."""
        ...


class PeerTransport(Protocol):
    """What a peer link talks through: one request at a time to one peer (HttpClient)."""

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """The peer's answer; PeerError when there is none (connect, TLS, I/O, framing)."""
        ...

    async def aclose(self) -> None: ...


class Observer(Protocol):
    """What this node measures for a round; None when it cannot contribute to it."""

    async def measure(self, round_id: str, window_hours: int) -> Measurement | None: ...


BlockingRunner = Callable[[Callable[[], object]], Awaitable[object]]
"""How blocking file work (audit entries, state.json) runs: on a worker thread
(`trio.to_thread.run_sync`), or inline where a mock clock must see it finish."""
