"""The round coordinator on the autojump clock: heartbeats every second, and with an
interval, one round per interval, named from the interval's start on the clock it is
given (every node derives the same id), whatever the start-up moment or a slow start."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from anna_trio.coordinator import HEARTBEAT_PERIOD, RoundCoordinator, interval_round_id

EPOCH = 1_800_000_003.5  # the wall clock at trio time 0: mid-interval


@attrs.define
class TrioWallClock:
    """A wall clock that moves with Trio's (mock) clock."""

    at_zero: float = EPOCH

    def wall(self) -> float:
        return self.at_zero + trio.current_time()


@attrs.define
class Starts:
    """The coordinator's node: which rounds it was asked to start, and when."""

    slow: float = 0.0
    started: list[tuple[float, str, int]] = attrs.Factory(list)

    async def start_round(self, round_id: str | None, window_hours: int) -> str | None:
        assert round_id is not None
        self.started.append((trio.current_time(), round_id, window_hours))
        await trio.sleep(self.slow)
        return round_id


async def run_for(seconds: float, coordinator: RoundCoordinator) -> None:
    with trio.move_on_after(seconds):
        await coordinator.run()


@pytest.mark.parametrize("slow", [0.0, 2.5])
async def test_one_round_per_interval_named_by_its_start(
    autojump_clock: trio.testing.MockClock, slow: float
) -> None:
    clock = TrioWallClock()
    node = Starts(slow=slow)
    beats: list[float] = []
    coordinator = RoundCoordinator(node, 10.0, lambda: beats.append(trio.current_time()), clock)
    await run_for(35.0, coordinator)
    expected = [
        (when, interval_round_id(EPOCH + when, 10.0), 24) for when in (0.0, 6.5, 16.5, 26.5)
    ]
    assert node.started == expected
    assert [s[1] for s in node.started] == [
        "round_20270115T080000Z",
        "round_20270115T080010Z",
        "round_20270115T080020Z",
        "round_20270115T080030Z",
    ]
    assert beats == [HEARTBEAT_PERIOD * n for n in range(35)]


async def test_without_an_interval_only_heartbeats(autojump_clock: trio.testing.MockClock) -> None:
    node = Starts()
    beats: list[float] = []
    coordinator = RoundCoordinator(
        node, 0.0, lambda: beats.append(trio.current_time()), TrioWallClock()
    )
    await run_for(5.0, coordinator)
    assert node.started == [] and len(beats) == 5


def test_sub_second_intervals_keep_their_fraction() -> None:
    assert interval_round_id(EPOCH, 0.5) == "round_20270115T080003.500000Z"
    assert interval_round_id(EPOCH + 0.49, 0.5) == interval_round_id(EPOCH, 0.5)
