"""Deterministic fillings of the node's seams (anna_trio.seams): the wall clock, the
observer, the audit_id reservation and an allocator that notes what it hands out.

Each type-checks as the Protocol or class it stands in for, without `type: ignore`.
"""

from __future__ import annotations

import functools
import hashlib
import random
from datetime import UTC, datetime
from pathlib import Path

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from anna_trio.audit import AuditIdAllocator, IdReservation
from anna_trio.models import SyntheticObserver, format_utc
from anna_trio.observer import ConfiguredObserver, Measurement

from .process import Process

EPOCH = datetime(2026, 1, 1, tzinfo=UTC).timestamp()


@functools.cache
def node_key(node_id: str) -> Ed25519PrivateKey:
    """A node's signing key, derived from its id (Ed25519 signs deterministically)."""
    seed = hashlib.sha256(f"anna-trio-sim-key|{node_id}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


@attrs.frozen
class SimClock:
    """seams.Clock: a fixed epoch plus Trio's (mock) time, off by this node's skew."""

    skew: float = 0.0

    def wall(self) -> float:
        return EPOCH + self.skew + trio.current_time()

    def rfc3339(self) -> str:
        """The audit log's time source."""
        return format_utc(datetime.fromtimestamp(self.wall(), UTC))


class SimObserver:
    """seams.Observer: the synthetic observer on a seeded source; sometimes slow (a
    measurement that takes up to `slow_max` seconds), sometimes without a measurement."""

    def __init__(
        self,
        node_id: str,
        rng: random.Random,
        *,
        tis: float,
        slow: float = 0.0,
        slow_max: float = 0.0,
        absent: float = 0.0,
    ) -> None:
        self._rng = rng
        self._synthetic = ConfiguredObserver(SyntheticObserver(tis=tis, jitter=0.01), node_id, rng)
        self._slow = slow
        self._slow_max = slow_max
        self._absent = absent

    async def measure(self, round_id: str, window_hours: int) -> Measurement | None:
        if self._rng.random() < self._absent:
            return None
        if self._rng.random() < self._slow:
            await trio.sleep(self._rng.uniform(0.0, self._slow_max))
        return await self._synthetic.measure(round_id, window_hours)


class SimReservation(IdReservation):
    """The audit_id reservation, kept with the node's media. The real one is an fsynced
    atomic rename, so it is durable at once here too, power cuts included."""

    def __init__(self, node_id: str) -> None:
        super().__init__(Path("sim") / node_id / "audit_ids")
        self.mark = 0

    def read(self) -> int:
        return self.mark

    def write(self, through: int) -> None:
        self.mark = through


class RecordingAllocator(AuditIdAllocator):
    """The real allocator, on the node's reservation and its process's inline runner,
    noting in `handed_out` (kept across the node's processes) each id it hands out
    while its process lives."""

    def __init__(
        self, reservation: SimReservation, process: Process, handed_out: list[int]
    ) -> None:
        super().__init__(0, reservation, run_blocking=process.run_blocking)
        self._process = process
        self._handed_out = handed_out

    def _note(self, taken: int) -> int:
        if self._process.alive:
            self._handed_out.append(taken)
        return taken

    def next(self) -> int:
        return self._note(super().next())

    async def next_async(self) -> int:
        return self._note(await super().next_async())
