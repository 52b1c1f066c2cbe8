"""Interval rounds: every node derives the same round id from the interval's start.

Starting a round is idempotent, so each node starting `round_<interval start>` on its
own keeps the cluster running one round per interval even while any node is down.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import trio

from .seams import Clock

log = logging.getLogger("anna.coordinator")

HEARTBEAT_PERIOD = 1.0
DEFAULT_WINDOW_HOURS = 24


def interval_round_id(wall_time: float, interval: float) -> str:
    """`round_<UTC start of the interval, ISO basic>` (fractional seconds for sub-second intervals)."""
    start = math.floor(wall_time / interval) * interval
    moment = datetime.fromtimestamp(start, UTC)
    if interval >= 1 and float(interval).is_integer():
        return "round_" + moment.strftime("%Y%m%dT%H%M%SZ")
    return "round_" + moment.strftime("%Y%m%dT%H%M%S.%fZ")


class RoundStarter(Protocol):
    async def start_round(self, round_id: str | None, window_hours: int) -> str | None: ...


class RoundCoordinator:
    """Heartbeats for the watchdog, and with an interval, one round per interval."""

    def __init__(
        self, node: RoundStarter, interval: float, heartbeat: Callable[[], None], clock: Clock
    ) -> None:
        self._node = node
        self._interval = interval
        self._heartbeat = heartbeat
        self._clock = clock

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._beat)
            if self._interval > 0:
                nursery.start_soon(self._interval_rounds)

    async def _beat(self) -> None:
        """Proves to the watchdog that this event loop still schedules tasks."""
        while True:
            self._heartbeat()
            await trio.sleep(HEARTBEAT_PERIOD)

    async def _interval_rounds(self) -> None:
        while True:
            now = self._clock.wall()
            round_id = interval_round_id(now, self._interval)
            await self._node.start_round(round_id, DEFAULT_WINDOW_HOURS)
            next_start = (math.floor(now / self._interval) + 1) * self._interval
            await trio.sleep(max(0.0, next_start - self._clock.wall()))
