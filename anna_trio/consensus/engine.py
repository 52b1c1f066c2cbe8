"""The pure consensus state machine (SPEC §8): no I/O, no Trio, no clock reads.

Callers pass `now` in and get a list of events back. Signatures are checked by the
caller before anything reaches the engine, so an invalid signature never marks
anyone here.

Results are a pure function of the observations and evidence held, whatever the
order of arrival. That needs the Byzantine rules to be acyclic, so they are
evaluated in this fixed cascade:

1. evidence -> each node's earliest conflict round (`ConflictingObservations`);
2. *base* results, excluding only conflict-marked nodes (from their conflict round on);
3. `ExcessiveDeviation`: a node whose TIS is more than the threshold away from the
   base consensus in `window_count` consecutive base-Complete rounds (round_id order,
   the node observed in each) is recorded at the round ending the earliest such window;
4. a node's record is its earliest conflict or deviation round (conflict wins a tie);
   it is excluded — not counted, not waited for — in every round with round_id >= it;
5. final results and statuses, excluding every recorded node.

Deviation is judged against base results, never against results its own marks
changed, so there is nothing to iterate to a fixed point. A deviation record can
move or vanish when a late round breaks its window (`ByzantineCleared`); conflict
records only ever move earlier.

Work per observation is O(validators + log rounds): only the touched round, the
deviation windows around it and the rounds between a record's old and new round
are recomputed.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import types
from collections import Counter
from collections.abc import Collection, Iterable, Mapping

import attrs

from ..crypto import observation_digest
from ..models import Evidence, Observation
from .events import (
    CONFLICTING_OBSERVATIONS,
    EXCESSIVE_DEVIATION,
    Accepted,
    ByzantineCleared,
    ByzantineDetected,
    ByzantineRecord,
    ConflictDetected,
    Duplicate,
    Event,
    InvalidEvidence,
    NotAValidator,
    ResultChanged,
    RoundCompleted,
    RoundFailed,
    RoundOpened,
    RoundPruned,
    RoundResult,
    RoundTooOld,
)

PENDING = "Pending"
COMPLETE = "Complete"
FAILED = "Failed"
ALL_HELD = "*"  # in an anti-entropy summary: "I hold every validator's observation"
FINGERPRINT_HEX = 16

_REASON_RANK = {CONFLICTING_OBSERVATIONS: 0, EXCESSIVE_DEVIATION: 1}


def _positive(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _not_negative(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.frozen
class EngineConfig:
    """What a round is created with; `reconfigure` affects only rounds created later."""

    validators: frozenset[str]
    quorum: int = attrs.field(validator=_positive)
    deviation_threshold: float = attrs.field(default=0.3, validator=_not_negative)
    window_count: int = attrs.field(default=3, validator=_positive)
    round_timeout: float = attrs.field(default=10.0, validator=_not_negative)
    retain_rounds: int = attrs.field(default=1000, validator=_positive)
    """Rounds kept in memory (most recent by round_id); older finished ones are pruned."""


@attrs.frozen
class RoundView:
    """An immutable snapshot of one round."""

    round_id: str
    window_hours: int
    status: str
    """`Pending`, `Complete` or `Failed`."""
    observations: tuple[Observation, ...]
    """Every node's held observation, by node id, including nodes later marked."""
    required_quorum: int
    validators: frozenset[str]
    learned_at: float
    deadline: float
    completed_at: float | None
    result: RoundResult


def signed_tis(obs: Observation) -> float:
    """`tis_overall` as the signature covers it (SPEC §3 signs `{tis_overall:.6f}`)."""
    return float(f"{obs.tis_overall:.6f}")


def consensus_result(counted: Iterable[tuple[Observation, str]], quorum: int) -> RoundResult:
    """The result over counted (observation, digest) pairs: median TIS, quorum biases.

    TIS values are taken as signed (6 decimals), so observations with equal digests
    always yield equal results.
    """
    pairs = sorted(counted, key=lambda pair: pair[0].node_id)
    values = sorted(signed_tis(obs) for obs, _ in pairs)
    middle = len(values) // 2
    if not values:
        tis: float | None = None
    elif len(values) % 2:
        tis = values[middle]
    else:
        tis = (values[middle - 1] + values[middle]) / 2
    flag_counts = Counter(flag for obs, _ in pairs for flag in set(obs.bias_flags))
    biases = tuple(sorted(flag for flag, count in flag_counts.items() if count >= quorum))
    nodes = tuple(obs.node_id for obs, _ in pairs)
    hasher = hashlib.sha256(b"anna-result-v1\n")
    for digest in sorted(digest for _, digest in pairs):
        hasher.update(digest.encode() + b"\n")
    hasher.update(f"{tis!r}|{','.join(biases)}|{','.join(nodes)}".encode())
    return RoundResult(tis, biases, nodes, hasher.hexdigest())


EMPTY_RESULT = consensus_result((), 1)


@attrs.define(eq=False)
class _Round:
    round_id: str
    window_hours: int
    validators: frozenset[str]
    quorum: int
    threshold: float
    window_count: int
    learned_at: float
    deadline: float
    held: dict[str, Observation] = attrs.Factory(dict)
    """node id -> its observation; with a conflict, the one with the smallest digest."""
    digests: dict[str, str] = attrs.Factory(dict)
    fingerprint: str | None = None
    """`held_fingerprint` of `digests`, kept until `held` changes."""
    seen: set[str] = attrs.Factory(set)
    """Digests of every observation learned for this round, conflicting ones included."""
    evidence: dict[str, Evidence] = attrs.Factory(dict)
    """node id -> the first conflicting pair learned for it in this round."""
    closed: bool = False
    status: str = PENDING
    ever_completed: bool = False
    completed_at: float | None = None
    result: RoundResult = EMPTY_RESULT
    base_complete: bool = False
    deviants: frozenset[str] = frozenset()


def _hold(state: _Round, obs: Observation, digest: str) -> None:
    """The observation the round counts for its node (with a conflict, the smaller digest)."""
    state.held[obs.node_id] = obs
    state.digests[obs.node_id] = digest
    state.fingerprint = None


def held_fingerprint(digests: Iterable[tuple[str, str]]) -> str:
    """Identity of a set of (node id, observation digest) pairs: equal sets, equal
    prints. 64 bits: an equivocator cannot grind a second observation that collides."""
    hasher = hashlib.sha256(b"anna-held-v1\n")
    for node_id, digest in sorted(digests):
        hasher.update(f"{node_id}:{digest}\n".encode())
    return hasher.hexdigest()[:FINGERPRINT_HEX]


def _normalised(a: Observation, digest_a: str, b: Observation, digest_b: str) -> Evidence:
    return Evidence(a, b) if digest_a < digest_b else Evidence(b, a)


class Engine:
    """Rounds, observations, evidence and Byzantine records; see the module docstring."""

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._max_window = config.window_count
        self._rounds: dict[str, _Round] = {}
        self._ids: list[str] = []  # sorted round ids
        self._deadlines: list[tuple[float, str]] = []  # heap; stale entries skipped lazily
        self._conflict_round: dict[str, str] = {}  # node -> earliest conflict round
        self._conflict_evidence: dict[str, Evidence] = {}
        self._complete_ids: list[str] = []  # sorted ids of base-Complete rounds
        self._window_holders: dict[str, frozenset[str]] = {}  # window end -> deviating nodes
        self._deviation_ends: dict[str, list[str]] = {}  # node -> sorted window ends
        self._pinned_deviation: dict[str, str] = {}  # node -> earliest pruned window end
        self._pruned_any = False
        self._records: dict[str, ByzantineRecord] = {}
        self._empty: set[str] = set()  # retained rounds holding no observation
        # Pending rounds not yet holding a quorum of counted observations -> learned_at,
        # oldest first: the work a node has not finished (admission control reads it).
        self._short: dict[str, float] = {}

    # --- configuration and rounds ---------------------------------------------------

    @property
    def config(self) -> EngineConfig:
        return self._config

    def reconfigure(self, config: EngineConfig) -> None:
        """Apply to rounds created from now on; existing rounds keep their settings."""
        self._config = config
        self._max_window = max(self._max_window, config.window_count)

    def open_round(self, round_id: str, window_hours: int, now: float) -> list[Event]:
        """Create the round if unknown (deadline = now + round_timeout); idempotent."""
        events: list[Event] = []
        if round_id not in self._rounds:
            self._create(round_id, window_hours, now, events)
        return events

    def _create(
        self, round_id: str, window_hours: int, now: float, events: list[Event]
    ) -> _Round | None:
        config = self._config
        full = len(self._rounds) >= config.retain_rounds
        if full and self._ids and round_id < self._ids[0] and not self._unjoined_finished():
            events.append(RoundTooOld(round_id))
            return None
        deadline = now + config.round_timeout
        record = _Round(
            round_id=round_id,
            window_hours=window_hours,
            validators=config.validators,
            quorum=config.quorum,
            threshold=config.deviation_threshold,
            window_count=config.window_count,
            learned_at=now,
            deadline=deadline,
        )
        self._rounds[round_id] = record
        self._empty.add(round_id)
        self._short[round_id] = now
        bisect.insort(self._ids, round_id)
        heapq.heappush(self._deadlines, (deadline, round_id))
        events.append(RoundOpened(round_id, window_hours))
        self._prune(events)
        # Nodes already marked at an earlier round are not waited for here either.
        self._settle(now, events, base={round_id}, final={round_id})
        return record

    def _unjoined_finished(self) -> list[str]:
        """Finished rounds holding no observation at all — named by a start or a push
        that no validator ever joined — oldest id first: the first to go."""
        return sorted(r for r in self._empty if self._rounds[r].status != PENDING)

    def _prune(self, events: list[Event]) -> None:
        """Over `retain_rounds`: drop finished rounds nobody joined (they are never
        Complete, so no deviation window needs them), then other finished rounds, oldest
        id first; a Pending round is never dropped. So rounds nobody joined never push
        out rounds validators have observations in."""
        excess = len(self._rounds) - self._config.retain_rounds
        if excess <= 0:
            return
        finished = [r for r in self._ids if self._rounds[r].status != PENDING]
        for round_id in list(dict.fromkeys([*self._unjoined_finished(), *finished]))[:excess]:
            self._ids.remove(round_id)
            del self._rounds[round_id]
            if round_id in self._empty:
                self._empty.discard(round_id)
            else:
                self._forget_window_end(round_id)
                self._pruned_any = True
            events.append(RoundPruned(round_id))

    def _forget_window_end(self, round_id: str) -> None:
        position = bisect.bisect_left(self._complete_ids, round_id)
        if position < len(self._complete_ids) and self._complete_ids[position] == round_id:
            del self._complete_ids[position]
        for node_id in self._window_holders.pop(round_id, frozenset()):
            ends = self._deviation_ends[node_id]
            ends.remove(round_id)
            pinned = self._pinned_deviation.get(node_id)
            if pinned is None or round_id < pinned:
                self._pinned_deviation[node_id] = round_id

    # --- observations and evidence --------------------------------------------------

    def add_observation(self, obs: Observation, now: float) -> list[Event]:
        """Merge one observation whose signature and validator the caller checked."""
        return self.add_observations([obs], now)

    def add_observations(self, batch: Iterable[Observation], now: float) -> list[Event]:
        """Merge observations whose signatures the caller checked, as if one at a time,
        recomputing each touched round once at the end rather than after each (a relay
        brings a whole round's observations in one batch)."""
        events: list[Event] = []
        touched: set[str] = set()
        for obs in batch:
            if self._add(obs, now, events):
                touched.add(obs.round_id)
        if touched:
            self._settle(now, events, base=set(touched), final=touched)
        return events

    def _add(self, obs: Observation, now: float, events: list[Event]) -> bool:
        """One observation in; True if it was accepted and its round awaits settling."""
        state = self._rounds.get(obs.round_id)
        if state is None:
            state = self._create(obs.round_id, obs.window_hours, now, events)
            if state is None:
                return False
        if obs.node_id not in state.validators:
            events.append(NotAValidator(obs))
            return False
        digest = observation_digest(obs)
        if digest in state.seen:
            events.append(Duplicate(obs))
            return False
        state.seen.add(digest)
        existing = state.held.get(obs.node_id)
        if existing is None:
            self._empty.discard(state.round_id)
            _hold(state, obs, digest)
            events.append(Accepted(obs))
            return True
        existing_digest = state.digests[obs.node_id]
        evidence = _normalised(existing, existing_digest, obs, digest)
        if digest < existing_digest:
            _hold(state, obs, digest)
        events.append(ConflictDetected(evidence))
        base: set[str] = set()
        final = {state.round_id}
        nodes = self._record_conflict(evidence, base, final)
        self._settle(now, events, base=base, final=final, nodes=nodes)
        return False

    def add_evidence(self, evidence: Evidence, now: float) -> list[Event]:
        """Merge evidence whose two signatures the caller checked; marks its node."""
        first, second = evidence.first, evidence.second
        if first.node_id != second.node_id:
            return [InvalidEvidence("observations are from different nodes")]
        if first.round_id != second.round_id:
            return [InvalidEvidence("observations are for different rounds")]
        first_digest, second_digest = observation_digest(first), observation_digest(second)
        if first_digest == second_digest:
            return [InvalidEvidence("the two observations are the same")]
        evidence = _normalised(first, first_digest, second, second_digest)
        events: list[Event] = []
        state = self._rounds.get(evidence.round_id)
        if state is None:
            state = self._create(evidence.round_id, first.window_hours, now, events)
        node_id = evidence.node_id
        if state is None:
            since = self._conflict_round.get(node_id)
            learned = since is None or evidence.round_id < since
        else:
            learned = node_id not in state.evidence
        if state is not None and node_id in state.validators:
            learned |= not {first_digest, second_digest} <= state.seen
            state.seen.update((first_digest, second_digest))
            low_digest = min(first_digest, second_digest)
            held_digest = state.digests.get(node_id)
            if held_digest is None or low_digest < held_digest:
                self._empty.discard(state.round_id)
                _hold(state, evidence.first, low_digest)
        if not learned:
            return events
        events.append(ConflictDetected(evidence))
        base: set[str] = set()
        final = {state.round_id} if state is not None else set()
        nodes = self._record_conflict(evidence, base, final)
        self._settle(now, events, base=base, final=final, nodes=nodes)
        return events

    def _record_conflict(self, evidence: Evidence, base: set[str], final: set[str]) -> set[str]:
        """Keep the evidence; move the node's conflict round earlier if it is."""
        node_id, round_id = evidence.node_id, evidence.round_id
        state = self._rounds.get(round_id)
        if state is not None:
            state.evidence.setdefault(node_id, evidence)
        previous = self._conflict_round.get(node_id)
        if previous is not None and previous <= round_id:
            return set()
        self._conflict_round[node_id] = round_id
        self._conflict_evidence[node_id] = evidence
        changed = self._ids_between(round_id, previous)
        base.update(changed)
        final.update(changed)
        return {node_id}

    # --- expiry ---------------------------------------------------------------------

    def expire(self, now: float) -> list[Event]:
        """Close Pending rounds whose deadline <= now: Complete or Failed."""
        events: list[Event] = []
        closing: set[str] = set()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, round_id = heapq.heappop(self._deadlines)
            state = self._rounds.get(round_id)
            if state is not None and not state.closed:
                state.closed = True
                closing.add(round_id)
        if closing:
            self._settle(now, events, base=closing, final=closing)
        return events

    def next_deadline(self) -> float | None:
        """The earliest deadline of a Pending round, if any."""
        while self._deadlines:
            deadline, round_id = self._deadlines[0]
            state = self._rounds.get(round_id)
            if state is not None and not state.closed:
                return deadline
            heapq.heappop(self._deadlines)
        return None

    # --- the cascade ----------------------------------------------------------------

    def _conflict_excluded(self, node_id: str, round_id: str) -> bool:
        since = self._conflict_round.get(node_id)
        return since is not None and since <= round_id

    def _excluded(self, node_id: str, round_id: str) -> bool:
        record = self._records.get(node_id)
        return record is not None and record.round_id <= round_id

    def _ids_between(self, low: str, high: str | None) -> list[str]:
        """Retained round ids in [low, high), or from low on when high is None."""
        start = bisect.bisect_left(self._ids, low)
        stop = len(self._ids) if high is None else bisect.bisect_left(self._ids, high)
        return self._ids[start:stop]

    def _settle(
        self,
        now: float,
        events: list[Event],
        *,
        base: set[str],
        final: set[str],
        nodes: Iterable[str] = (),
    ) -> None:
        """Run the cascade over what changed until nothing more does."""
        refresh = set(nodes)
        while base or final or refresh:
            deviation_dirty = [rid for rid in sorted(base) if self._recompute_base(rid)]
            refresh |= self._update_windows(deviation_dirty)
            for node_id in sorted(refresh):
                self._refresh_record(node_id, now, events, final)
            base, refresh = set(), set()
            for round_id in sorted(final):
                if self._recompute_final(round_id, now, events):
                    base.add(round_id)
            final = set()

    def _recompute_base(self, round_id: str) -> bool:
        """Base result facts for deviation; True if the round's deviation inputs changed."""
        state = self._rounds.get(round_id)
        if state is None:
            return False
        counted = [
            obs for node, obs in state.held.items() if not self._conflict_excluded(node, round_id)
        ]
        complete = state.closed and len(counted) >= state.quorum
        deviants: frozenset[str] = frozenset()
        if complete:
            tis = consensus_result(((obs, "") for obs in counted), state.quorum).consensus_tis
            assert tis is not None
            deviants = frozenset(
                obs.node_id for obs in counted if abs(signed_tis(obs) - tis) > state.threshold
            )
        changed = complete != state.base_complete or deviants != state.deviants
        state.base_complete, state.deviants = complete, deviants
        return changed

    def _update_windows(self, dirty: list[str]) -> set[str]:
        """Re-judge deviation windows touching the dirty rounds; return nodes affected."""
        if not dirty:
            return set()
        affected: set[str] = set()
        for round_id in dirty:
            state = self._rounds[round_id]
            position = bisect.bisect_left(self._complete_ids, round_id)
            present = (
                position < len(self._complete_ids) and self._complete_ids[position] == round_id
            )
            if state.base_complete and not present:
                self._complete_ids.insert(position, round_id)
            elif not state.base_complete and present:
                del self._complete_ids[position]
                old = self._window_holders.pop(round_id, frozenset())
                for node_id in old:
                    self._deviation_ends[node_id].remove(round_id)
                affected |= old
        ends: set[int] = set()
        for round_id in dirty:
            position = bisect.bisect_left(self._complete_ids, round_id)
            stop = min(len(self._complete_ids), position + self._max_window)
            ends.update(range(position, stop))
        for end in sorted(ends):
            affected |= self._judge_window(end)
        return affected

    def _judge_window(self, end: int) -> set[str]:
        end_id = self._complete_ids[end]
        size = self._rounds[end_id].window_count
        start = end - size + 1
        if start < 0 and self._pruned_any:
            return set()  # the window reaches into forgotten rounds: keep the old verdict
        holders: frozenset[str] = frozenset()
        if start >= 0:
            holders = self._rounds[end_id].deviants
            for round_id in self._complete_ids[start:end]:
                holders &= self._rounds[round_id].deviants
        old = self._window_holders.get(end_id, frozenset())
        if holders == old:
            return set()
        if holders:
            self._window_holders[end_id] = holders
        else:
            self._window_holders.pop(end_id, None)
        for node_id in old - holders:
            self._deviation_ends[node_id].remove(end_id)
        for node_id in holders - old:
            bisect.insort(self._deviation_ends.setdefault(node_id, []), end_id)
        return set(old ^ holders)

    def _refresh_record(
        self, node_id: str, now: float, events: list[Event], final: set[str]
    ) -> None:
        candidates: list[tuple[str, int]] = []
        conflict = self._conflict_round.get(node_id)
        if conflict is not None:
            candidates.append((conflict, 0))
        deviation = [
            *self._deviation_ends.get(node_id, [])[:1],
            *([self._pinned_deviation[node_id]] if node_id in self._pinned_deviation else []),
        ]
        if deviation:
            candidates.append((min(deviation), 1))
        wanted = min(candidates) if candidates else None
        old = self._records.get(node_id)
        old_key = (old.round_id, _REASON_RANK[old.reason]) if old is not None else None
        if wanted == old_key:
            return
        if wanted is None:
            assert old is not None
            del self._records[node_id]
            events.append(ByzantineCleared(node_id))
            final.update(self._ids_between(old.round_id, None))
            return
        round_id, rank = wanted
        is_conflict = rank == 0
        record = ByzantineRecord(
            node_id=node_id,
            reason=CONFLICTING_OBSERVATIONS if is_conflict else EXCESSIVE_DEVIATION,
            round_id=round_id,
            detected_at=now,
            evidence=self._conflict_evidence[node_id] if is_conflict else None,
        )
        self._records[node_id] = record
        events.append(ByzantineDetected(record, first_time=old is None))
        if old is None:
            final.update(self._ids_between(round_id, None))
        else:
            low, high = sorted((old.round_id, round_id))
            final.update(self._ids_between(low, high))

    def _recompute_final(self, round_id: str, now: float, events: list[Event]) -> bool:
        """Final result and status; True if the round closed just now (all are in)."""
        state = self._rounds.get(round_id)
        if state is None:
            return False
        counted = [
            (obs, state.digests[node])
            for node, obs in state.held.items()
            if not self._excluded(node, round_id)
        ]
        result = consensus_result(counted, state.quorum)
        newly_closed = False
        if not state.closed and all(
            node in state.held or self._excluded(node, round_id) for node in state.validators
        ):
            state.closed = newly_closed = True
        previous_status, previous_result = state.status, state.result
        state.result = result
        if state.closed:
            state.status = COMPLETE if len(counted) >= state.quorum else FAILED
        if state.closed or len(counted) >= state.quorum:
            self._short.pop(round_id, None)
        if state.status == COMPLETE and previous_status != COMPLETE:
            first_time = not state.ever_completed
            if first_time:
                state.ever_completed, state.completed_at = True, now
            events.append(RoundCompleted(round_id, result, first_time, now - state.learned_at))
        elif state.status == FAILED and previous_status != FAILED:
            events.append(RoundFailed(round_id))
        elif state.status == COMPLETE and result != previous_result:
            events.append(ResultChanged(round_id, result))
        return newly_closed

    # --- queries --------------------------------------------------------------------

    def short_of_quorum(self) -> tuple[int, float | None]:
        """How many Pending rounds do not hold a quorum yet, and when the oldest of them
        was learned. (A round that holds one ends Complete at its deadline at the latest.)"""
        return len(self._short), next(iter(self._short.values()), None)

    def round(self, round_id: str) -> RoundView | None:
        state = self._rounds.get(round_id)
        return None if state is None else self._view(state)

    def rounds(self) -> list[RoundView]:
        """Every retained round, oldest first by round_id."""
        return [self._view(self._rounds[round_id]) for round_id in self._ids]

    def round_ids(self) -> list[str]:
        return list(self._ids)

    def status_of(self, round_id: str) -> str | None:
        """`Pending`, `Complete` or `Failed`; None for a round not retained."""
        state = self._rounds.get(round_id)
        return None if state is None else state.status

    def observation_of(self, round_id: str, node_id: str) -> Observation | None:
        """The observation held from `node_id` for the round, if any (no view built)."""
        state = self._rounds.get(round_id)
        return None if state is None else state.held.get(node_id)

    @staticmethod
    def _view(state: _Round) -> RoundView:
        return RoundView(
            round_id=state.round_id,
            window_hours=state.window_hours,
            status=state.status,
            observations=tuple(state.held[node] for node in sorted(state.held)),
            required_quorum=state.quorum,
            validators=state.validators,
            learned_at=state.learned_at,
            deadline=state.deadline,
            completed_at=state.completed_at,
            result=state.result,
        )

    @property
    def byzantine(self) -> Mapping[str, ByzantineRecord]:
        """Read-only view of the current records, by node id."""
        return types.MappingProxyType(self._records)

    def evidence(self) -> list[Evidence]:
        """Evidence held for retained rounds plus every record's, by (round, node)."""
        held = {
            (round_id, node_id): evidence
            for round_id, state in self._rounds.items()
            for node_id, evidence in state.evidence.items()
        }
        for node_id, evidence in self._conflict_evidence.items():
            held.setdefault((evidence.round_id, node_id), evidence)
        return [held[key] for key in sorted(held)]

    def summary(self, limit_rounds: int) -> dict[str, list[str]]:
        """{round_id: sorted node ids held} for our most recent `limit_rounds` rounds;
        [ALL_HELD] for a round that holds every validator's observation, which keeps an
        anti-entropy pull small once rounds are done (15 ids a round at 15 nodes)."""
        summary = {}
        for round_id in self._recent(limit_rounds):
            state = self._rounds[round_id]
            full = state.held.keys() >= state.validators
            summary[round_id] = [ALL_HELD] if full else sorted(state.held)
        return summary

    def fingerprints(self, limit_rounds: int) -> dict[str, str]:
        """{round_id: `held_fingerprint` of what we hold} for the rounds `summary` names.

        A summary lists node ids only, so an answerer holding another observation for a
        node the asker lists — an equivocator's other half — would never send it: each
        honest node kept the half it was given and their results differed forever. With
        the fingerprints beside the summary it can tell, and sends its own."""
        return {
            round_id: self._fingerprint(self._rounds[round_id])
            for round_id in self._recent(limit_rounds)
        }

    def _fingerprint(self, state: _Round, nodes: Collection[str] | None = None) -> str:
        if nodes is None or nodes == state.held.keys():
            if state.fingerprint is None:
                state.fingerprint = held_fingerprint(state.digests.items())
            return state.fingerprint
        return held_fingerprint((node, state.digests[node]) for node in nodes)

    def observations_missing_from(
        self,
        summary: Mapping[str, Collection[str]],
        limit_rounds: int,
        fingerprints: Mapping[str, str] | None = None,
    ) -> list[Observation]:
        """Observations of our most recent rounds that an asker's summary lacks, and
        every one of a round where we hold each node the asker lists but its
        `fingerprints` say it holds other observations for some of them."""
        missing: list[Observation] = []
        for round_id in self._recent(limit_rounds):
            state = self._rounds[round_id]
            held = state.held
            theirs = summary.get(round_id, ())
            listed = set(state.validators if ALL_HELD in theirs else theirs)
            theirs_print = (fingerprints or {}).get(round_id)
            if (
                theirs_print is not None
                and listed
                and listed <= held.keys()
                and self._fingerprint(state, listed) != theirs_print
            ):
                missing.extend(held[node] for node in sorted(held))
            elif ALL_HELD not in theirs:
                missing.extend(held[node] for node in sorted(held) if node not in theirs)
        return missing

    def recent_windows(self, limit_rounds: int) -> list[tuple[str, int]]:
        """(round_id, window_hours) of our most recent rounds, oldest first."""
        return [(r, self._rounds[r].window_hours) for r in self._recent(limit_rounds)]

    def _recent(self, limit_rounds: int) -> list[str]:
        return self._ids[-limit_rounds:] if limit_rounds > 0 else []
