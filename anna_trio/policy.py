"""The node's relay and timer policy, pure: every decision takes the time as an argument.

Push-pull gossip (README "How it works"): a round start carries the starter's
observation and each gossip answer carries the answering node's back. At 3 validators
each peer also sends its own straight to the third node; above 3 the starter relays
what came back, one batch per peer. A round still Pending a while after it began pulls
from every peer at once, at most once per half round timeout.
"""

from __future__ import annotations

import heapq
import math
from datetime import UTC, datetime

import attrs

from .models import Observation

DIRECT_FAN_OUT_MAX_VALIDATORS = 3
STUCK_ROUND_FRACTION = 0.25
RELAY_LINGER = 0.1
STUCK, RELAY = "stuck", "relay"


def direct_fan_out(validator_count: int) -> bool:
    """Whether observations go straight to every peer rather than through the round's
    starter. Relaying costs N-1 requests against (N-1)(N-2) direct ones, so it only pays
    above 3 validators; at 3 the requests are equal and direct saves a hop."""
    return validator_count <= DIRECT_FAN_OUT_MAX_VALIDATORS


def stuck_check_delay(round_timeout: float) -> float:
    """How long after learning of a round its Pending status calls for an early pull."""
    return STUCK_ROUND_FRACTION * round_timeout


@attrs.frozen(order=True)
class Timer:
    when: float
    kind: str  # STUCK or RELAY
    round_id: str


class Timers:
    """The node's own timers (relay lingers, stuck-round checks), earliest first."""

    def __init__(self) -> None:
        self._heap: list[Timer] = []

    def add(self, now: float, delay: float, kind: str, round_id: str) -> None:
        heapq.heappush(self._heap, Timer(now + delay, kind, round_id))

    def next_at(self) -> float:
        return self._heap[0].when if self._heap else math.inf

    def pop_due(self, now: float) -> list[Timer]:
        due = []
        while self._heap and self._heap[0].when <= now:
            due.append(heapq.heappop(self._heap))
        return due


class EarlyPulls:
    """A stuck round pulls from every peer now rather than at the next anti-entropy
    tick — at most once per half round timeout, so an overloaded cluster, where every
    round is slow, is not also flooded with pulls."""

    def __init__(self, round_timeout: float) -> None:
        self._round_timeout = round_timeout
        self._quiet_until = -math.inf

    def due(self, now: float, *, stuck: bool) -> bool:
        if not stuck or now < self._quiet_until:
            return False
        self._quiet_until = now + self._round_timeout / 2
        return True


class RelayHolds:
    """Peers' observations for rounds we started, held so each peer gets them in one
    batch rather than one per answer: until RELAY_LINGER passes or the round closes."""

    def __init__(self) -> None:
        self._held: dict[str, list[Observation]] = {}

    def hold(self, obs: Observation) -> bool:
        """Hold it; True for the round's first, whose linger timer the caller starts."""
        first = obs.round_id not in self._held
        self._held.setdefault(obs.round_id, []).append(obs)
        return first

    def release(self, round_id: str) -> list[Observation]:
        return self._held.pop(round_id, [])


ADMISSION_AGE_FRACTION = 0.25
ADMISSION_RETRY_AFTER = 1.0


def round_admission(
    short_of_quorum: int,
    oldest_learned: float | None,
    now: float,
    *,
    round_timeout: float,
    limit: int,
) -> float | None:
    """None to start a new round; else the seconds a client should wait (Retry-After).

    A node that holds `limit` rounds still short of a quorum, or one short of it for a
    quarter of the round timeout, cannot finish more work in time: a round it started
    now would likely end Failed. Rounds that hold a quorum do not count: with a peer
    down they wait out their deadline for it, but they will end Complete."""
    if short_of_quorum >= limit:
        return ADMISSION_RETRY_AFTER
    if oldest_learned is not None and now - oldest_learned > ADMISSION_AGE_FRACTION * round_timeout:
        return ADMISSION_RETRY_AFTER
    return None


def clock_round_id(wall_time: float) -> str:
    """`round_<UTC time, ISO basic with microseconds>`: where a fresh round id made now
    sorts (`Node` goes above it when it already knows a round that sorts later)."""
    return "round_" + datetime.fromtimestamp(wall_time, UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def outsider_may_name(round_id: str, wall_time: float) -> bool:
    """Whether a client that is not a validator may start a new round named `round_id`.

    A node keeps the rounds whose ids sort last and refuses ids that sort before all of
    them, so a client free to name rounds that sort after every id the cluster makes
    could push out, and then refuse, every round the cluster starts from then on
    (`round_<time>` from the interval coordinator and fresh ids alike). Outsiders may
    therefore name only ids that sort no later than a fresh id made now; validators,
    whose rounds the cluster trusts, may name any."""
    return round_id <= clock_round_id(wall_time)
