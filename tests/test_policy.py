"""The node's pure policies: timers, early pulls, relay holds, admission (time passed in)."""

from __future__ import annotations

import itertools
import math

from hypothesis import given
from hypothesis import strategies as st

from anna_trio.coordinator import interval_round_id
from anna_trio.policy import (
    ADMISSION_AGE_FRACTION,
    DIRECT_FAN_OUT_MAX_VALIDATORS,
    RELAY,
    STUCK,
    EarlyPulls,
    RelayHolds,
    Timer,
    Timers,
    clock_round_id,
    direct_fan_out,
    outsider_may_name,
    round_admission,
)
from strategies import signed_observation

times = st.floats(min_value=0, max_value=1e6, allow_nan=False)


def test_direct_fan_out_only_up_to_three_validators() -> None:
    assert [direct_fan_out(n) for n in range(1, 6)] == [True, True, True, False, False]
    assert DIRECT_FAN_OUT_MAX_VALIDATORS == 3


@given(
    adds=st.lists(
        st.tuples(times, st.floats(0, 100), st.sampled_from([STUCK, RELAY]), st.text(max_size=3))
    ),
    now=times,
)
def test_timers_pop_exactly_the_due_ones_earliest_first(
    adds: list[tuple[float, float, str, str]], now: float
) -> None:
    timers = Timers()
    for at, delay, kind, round_id in adds:
        timers.add(at, delay, kind, round_id)
    due = timers.pop_due(now)
    everything = sorted(Timer(at + delay, kind, r) for at, delay, kind, r in adds)
    assert due == [t for t in everything if t.when <= now]
    rest = [t for t in everything if t.when > now]
    assert timers.next_at() == (rest[0].when if rest else math.inf)


@given(ticks=st.lists(st.tuples(times, st.booleans()), max_size=40), timeout=st.floats(0.1, 60))
def test_early_pulls_come_only_for_stuck_rounds_and_at_most_once_per_half_timeout(
    ticks: list[tuple[float, bool]], timeout: float
) -> None:
    pulls = EarlyPulls(timeout)
    pulled = []
    for now, stuck in sorted(ticks):
        if pulls.due(now, stuck=stuck):
            assert stuck
            pulled.append(now)
    assert all(b - a >= timeout / 2 for a, b in itertools.pairwise(pulled))


def test_relay_holds_say_which_observation_is_a_round_s_first() -> None:
    holds = RelayHolds()
    a, b = signed_observation("node_002", "r1"), signed_observation("node_003", "r1")
    assert holds.hold(a) is True
    assert holds.hold(b) is False
    assert holds.release("r1") == [a, b]
    assert holds.release("r1") == []


@given(
    short=st.integers(0, 200),
    age=st.none() | st.floats(0, 100),
    timeout=st.floats(0.1, 60),
    limit=st.integers(1, 100),
)
def test_admission_refuses_exactly_when_work_is_piling_up(
    short: int, age: float | None, timeout: float, limit: int
) -> None:
    now = 1000.0
    oldest = None if age is None or short == 0 else now - age
    wait = round_admission(short, oldest, now, round_timeout=timeout, limit=limit)
    piling = short >= limit or (
        oldest is not None and now - oldest > ADMISSION_AGE_FRACTION * timeout
    )
    assert (wait is not None) == piling
    assert wait is None or wait > 0


wall_times = st.floats(min_value=0, max_value=4e9, allow_nan=False)


@given(
    t=wall_times,
    later=st.floats(min_value=0, max_value=1e8, allow_nan=False),
    interval=st.integers(1, 86_400),
    round_id=st.from_regex(r"\A[A-Za-z0-9_.:-]{1,64}\Z"),
)
def test_no_round_an_outsider_may_name_sorts_after_the_cluster_s_later_rounds(
    t: float, later: float, interval: int, round_id: str
) -> None:
    """Ids an outsider may name at `t` sort before every fresh id made later and before
    the interval coordinator's ids from the next interval on, so no flood of them can
    make a later cluster round sort before everything a node keeps."""
    allowed = outsider_may_name(round_id, t)
    assert allowed == (round_id <= clock_round_id(t))
    if allowed:
        assert round_id <= clock_round_id(t + later)
        next_interval = (math.floor(t / interval) + 1) * interval
        assert round_id < interval_round_id(next_interval + later, interval)
