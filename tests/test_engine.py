"""Unit tests of the pure consensus engine: one behaviour per test."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anna_trio.consensus import (
    ALL_HELD,
    CONFLICTING_OBSERVATIONS,
    EXCESSIVE_DEVIATION,
    Accepted,
    ByzantineCleared,
    ByzantineDetected,
    ConflictDetected,
    Duplicate,
    Engine,
    EngineConfig,
    InvalidEvidence,
    NotAValidator,
    ResultChanged,
    RoundCompleted,
    RoundFailed,
    RoundOpened,
    RoundPruned,
    RoundTooOld,
    consensus_result,
)
from anna_trio.crypto import observation_digest
from anna_trio.models import Evidence, Observation
from strategies import NODE_IDS, signed_observation

A, B, C, D = NODE_IDS[:4]


def make_engine(nodes: int = 3, quorum: int = 2, **options: float) -> Engine:
    return Engine(EngineConfig(frozenset(NODE_IDS[:nodes]), quorum, **options))  # type: ignore[arg-type]


def kinds(events: Sequence[object]) -> list[str]:
    return [type(event).__name__ for event in events]


def conflicting(node: str, round_id: str) -> tuple[Observation, Observation]:
    return (
        signed_observation(node, round_id, 0.5, outcome_tag="x"),
        signed_observation(node, round_id, 0.5, outcome_tag="y"),
    )


def feed(engine: Engine, round_id: str, values: dict[str, float], now: float = 0.0) -> None:
    for node, tis in values.items():
        engine.add_observation(signed_observation(node, round_id, tis), now)


def test_open_round_is_idempotent_and_sets_deadline() -> None:
    """Opening a round twice emits RoundOpened once; deadline counts from learning."""
    engine = make_engine(round_timeout=5.0)
    assert engine.open_round("r1", 24, now=100.0) == [RoundOpened("r1", 24)]
    assert engine.open_round("r1", 24, now=200.0) == []
    view = engine.round("r1")
    assert view is not None
    assert (view.status, view.deadline, view.learned_at, view.window_hours) == (
        "Pending",
        105.0,
        100.0,
        24,
    )
    assert engine.next_deadline() == 105.0


def test_observation_for_unknown_round_opens_it() -> None:
    """An observation for an unknown round creates it with the observation's window."""
    engine = make_engine()
    obs = signed_observation(A, "r1", window_hours=48)
    assert engine.add_observation(obs, 1.0) == [RoundOpened("r1", 48), Accepted(obs)]
    view = engine.round("r1")
    assert view is not None and view.window_hours == 48 and view.observations == (obs,)


def test_identical_observation_is_a_duplicate() -> None:
    """The same signed observation twice is a Duplicate, never a conflict."""
    engine = make_engine()
    obs = signed_observation(A, "r1")
    engine.add_observation(obs, 0.0)
    assert engine.add_observation(obs, 1.0) == [Duplicate(obs)]
    assert engine.byzantine == {}


def test_node_outside_the_rounds_validator_set_is_rejected() -> None:
    """A node added after a round was created is NotAValidator for that round."""
    engine = make_engine(nodes=3)
    engine.open_round("r1", 24, 0.0)
    engine.reconfigure(EngineConfig(frozenset(NODE_IDS[:4]), 3))
    obs = signed_observation(D, "r1")
    assert engine.add_observation(obs, 1.0) == [NotAValidator(obs)]
    view = engine.round("r1")
    assert view is not None and view.observations == ()


def test_reconfigure_applies_only_to_new_rounds() -> None:
    """Validators, quorum and timeout of old rounds stay as they were created."""
    engine = make_engine(nodes=3, quorum=2, round_timeout=10.0)
    engine.open_round("r1", 24, 0.0)
    engine.reconfigure(EngineConfig(frozenset(NODE_IDS[:4]), 3, round_timeout=1.0))
    engine.open_round("r2", 24, 0.0)
    old, new = engine.round("r1"), engine.round("r2")
    assert old is not None and new is not None
    assert (len(old.validators), old.required_quorum, old.deadline) == (3, 2, 10.0)
    assert (len(new.validators), new.required_quorum, new.deadline) == (4, 3, 1.0)
    feed(engine, "r1", {A: 0.5, B: 0.5, C: 0.5})
    assert engine.round("r1").status == "Complete"  # type: ignore[union-attr]
    feed(engine, "r2", {A: 0.5, B: 0.5, C: 0.5})
    assert engine.round("r2").status == "Pending"  # type: ignore[union-attr]


def test_round_completes_when_every_validator_is_in() -> None:
    """The last validator's observation completes the round before its deadline."""
    engine = make_engine()
    engine.open_round("r1", 24, 10.0)
    feed(engine, "r1", {A: 0.8, B: 0.9}, now=11.0)
    events = engine.add_observation(signed_observation(C, "r1", 0.1), 12.5)
    completed = events[-1]
    assert isinstance(completed, RoundCompleted)
    assert (completed.first_time, completed.duration) == (True, 2.5)
    assert completed.result.consensus_tis == 0.8
    assert completed.result.participating_nodes == (A, B, C)
    assert engine.round("r1").completed_at == 12.5  # type: ignore[union-attr]
    assert engine.next_deadline() is None


def test_median_of_even_count_is_mean_of_middle_two() -> None:
    """Four counted values: consensus is the mean of the two middle ones."""
    obs = [
        signed_observation(n, "r", v)
        for n, v in zip(NODE_IDS[:4], (0.1, 0.4, 0.6, 0.9), strict=True)
    ]
    result = consensus_result(((o, observation_digest(o)) for o in obs), 3)
    assert result.consensus_tis == (0.4 + 0.6) / 2


def test_biases_need_quorum_reporters() -> None:
    """A flag counts only when at least quorum counted nodes report it; sorted."""
    obs = [
        signed_observation(A, "r", bias_flags=("RecencyBias", "AnchoringBias")),
        signed_observation(B, "r", bias_flags=("RecencyBias", "AnchoringBias")),
        signed_observation(C, "r", bias_flags=("RecencyBias", "Overconfidence")),
    ]
    result = consensus_result(((o, observation_digest(o)) for o in obs), 2)
    assert result.consensus_biases == ("AnchoringBias", "RecencyBias")
    assert consensus_result((), 2).consensus_tis is None


def test_result_digest_depends_on_the_counted_set_only() -> None:
    """Same counted observations in any order give the same digest; another set differs."""
    obs = [signed_observation(n, "r", 0.5) for n in (A, B, C)]
    pairs = [(o, observation_digest(o)) for o in obs]
    assert consensus_result(pairs, 2) == consensus_result(reversed(pairs), 2)
    assert consensus_result(pairs[:2], 2).digest != consensus_result(pairs, 2).digest


def test_deadline_with_quorum_completes() -> None:
    """At the deadline a round holding quorum is Complete."""
    engine = make_engine(round_timeout=10.0)
    feed(engine, "r1", {A: 0.5, B: 0.7})
    assert engine.expire(9.9) == []
    events = engine.expire(10.0)
    assert kinds(events) == ["RoundCompleted"]
    assert engine.round("r1").status == "Complete"  # type: ignore[union-attr]


def test_deadline_without_quorum_fails_then_late_arrival_completes() -> None:
    """Failed at the deadline; a late observation reaching quorum completes it once."""
    engine = make_engine(round_timeout=10.0)
    feed(engine, "r1", {A: 0.5})
    assert engine.expire(10.0) == [RoundFailed("r1")]
    events = engine.add_observation(signed_observation(B, "r1", 0.7), 30.0)
    completed = events[-1]
    assert isinstance(completed, RoundCompleted)
    assert completed.first_time and completed.duration == 30.0
    assert completed.result.consensus_tis == pytest.approx(0.6)


def test_late_observation_changes_a_complete_result() -> None:
    """A Complete round's result recomputed by a late observation emits ResultChanged."""
    engine = make_engine(round_timeout=1.0)
    feed(engine, "r1", {A: 0.5, B: 0.7})
    engine.expire(1.0)
    events = engine.add_observation(signed_observation(C, "r1", 0.9), 2.0)
    assert kinds(events) == ["Accepted", "ResultChanged"]
    changed = events[-1]
    assert isinstance(changed, ResultChanged) and changed.result.consensus_tis == 0.7


def test_conflicting_observation_marks_node_from_that_round_on() -> None:
    """Equivocation: evidence kept, node excluded from its round and later, counted earlier."""
    engine = make_engine(nodes=4, quorum=2)
    feed(engine, "r1", {A: 0.5, B: 0.5, C: 0.5, D: 0.5})
    feed(engine, "r3", {A: 0.5, B: 0.5, C: 0.5, D: 0.5})
    first, second = conflicting(D, "r2")
    engine.add_observation(first, 1.0)
    events = engine.add_observation(second, 2.0)
    assert kinds(events)[:2] == ["ConflictDetected", "ByzantineDetected"]
    conflict, detected = events[0], events[1]
    assert isinstance(conflict, ConflictDetected) and isinstance(detected, ByzantineDetected)
    assert {conflict.evidence.first, conflict.evidence.second} == {first, second}
    assert detected.first_time
    record = engine.byzantine[D]
    assert (record.reason, record.round_id, record.detected_at) == (
        CONFLICTING_OBSERVATIONS,
        "r2",
        2.0,
    )
    assert record.evidence == conflict.evidence
    assert D in engine.round("r1").result.participating_nodes  # type: ignore[union-attr]
    assert D not in engine.round("r3").result.participating_nodes  # type: ignore[union-attr]
    assert len(engine.round("r2").observations) == 1  # type: ignore[union-attr]
    assert engine.evidence() == [conflict.evidence]


def test_byzantine_node_is_not_waited_for() -> None:
    """After a conflict, the round completes once every other validator is in."""
    engine = make_engine(nodes=3, quorum=2)
    for obs in conflicting(C, "r1"):
        engine.add_observation(obs, 0.0)
    feed(engine, "r1", {A: 0.5})
    events = engine.add_observation(signed_observation(B, "r1", 0.5), 1.0)
    assert kinds(events) == ["Accepted", "RoundCompleted"]
    engine.open_round("r2", 24, 2.0)
    feed(engine, "r2", {A: 0.5, B: 0.5}, now=3.0)
    assert engine.round("r2").status == "Complete"  # type: ignore[union-attr]


def test_conflict_can_turn_a_complete_round_failed() -> None:
    """Excluding a node that a Complete round needed for quorum makes it Failed."""
    engine = make_engine(nodes=3, quorum=2, round_timeout=1.0)
    first, second = conflicting(B, "r1")
    engine.add_observation(first, 0.0)
    feed(engine, "r1", {A: 0.5})
    engine.expire(1.0)
    assert engine.round("r1").status == "Complete"  # type: ignore[union-attr]
    events = engine.add_observation(second, 2.0)
    assert kinds(events) == ["ConflictDetected", "ByzantineDetected", "RoundFailed"]


def test_evidence_marks_node_and_is_idempotent() -> None:
    """Evidence alone marks the node; the same evidence again changes nothing."""
    engine = make_engine()
    first, second = conflicting(B, "r1")
    events = engine.add_evidence(Evidence(first, second), 5.0)
    assert kinds(events) == ["RoundOpened", "ConflictDetected", "ByzantineDetected"]
    assert engine.byzantine[B].reason == CONFLICTING_OBSERVATIONS
    assert engine.add_evidence(Evidence(second, first), 6.0) == []
    assert engine.add_observation(first, 7.0) == [Duplicate(first)]
    assert engine.byzantine[B].detected_at == 5.0


@pytest.mark.parametrize(
    ("first", "second", "reason"),
    [
        (signed_observation(A, "r1"), signed_observation(B, "r1"), "different nodes"),
        (signed_observation(A, "r1"), signed_observation(A, "r2"), "different rounds"),
        (signed_observation(A, "r1"), signed_observation(A, "r1"), "the same"),
    ],
)
def test_evidence_that_proves_nothing_is_invalid(
    first: Observation, second: Observation, reason: str
) -> None:
    """Evidence needs one node, one round and two different observations."""
    engine = make_engine()
    events = engine.add_evidence(Evidence(first, second), 0.0)
    assert len(events) == 1 and isinstance(events[0], InvalidEvidence)
    assert reason in events[0].reason
    assert engine.byzantine == {} and engine.round_ids() == []


def test_record_moves_to_the_earliest_conflict_round() -> None:
    """Evidence for an earlier round moves the record there; later rounds stay excluded."""
    engine = make_engine(nodes=3, quorum=2)
    feed(engine, "r1", {A: 0.5, B: 0.5, C: 0.5})
    engine.add_evidence(Evidence(*conflicting(C, "r2")), 1.0)
    assert C in engine.round("r1").result.participating_nodes  # type: ignore[union-attr]
    events = engine.add_evidence(Evidence(*conflicting(C, "r1")), 2.0)
    detected = [e for e in events if isinstance(e, ByzantineDetected)]
    assert len(detected) == 1 and not detected[0].first_time
    assert engine.byzantine[C].round_id == "r1"
    assert C not in engine.round("r1").result.participating_nodes  # type: ignore[union-attr]
    assert "ResultChanged" in kinds(events)
    engine.add_evidence(Evidence(*conflicting(C, "r3")), 3.0)
    assert engine.byzantine[C].round_id == "r1"


def test_excessive_deviation_over_consecutive_complete_rounds() -> None:
    """A node far from consensus in window_count Complete rounds is marked at the last."""
    engine = make_engine(nodes=3, quorum=2, window_count=3, deviation_threshold=0.3)
    feed(engine, "r1", {A: 0.8, B: 0.8, C: 0.1})
    feed(engine, "r2", {A: 0.8, B: 0.8, C: 0.1})
    assert engine.byzantine == {}
    feed(engine, "r3", {A: 0.8, B: 0.8})
    events = engine.add_observation(signed_observation(C, "r3", 0.1), 1.0)
    detected = [e for e in events if isinstance(e, ByzantineDetected)]
    assert len(detected) == 1
    record = engine.byzantine[C]
    assert (record.reason, record.round_id, record.evidence) == (EXCESSIVE_DEVIATION, "r3", None)
    assert engine.round("r3").result.participating_nodes == (A, B)  # type: ignore[union-attr]
    assert engine.round("r2").result.participating_nodes == (A, B, C)  # type: ignore[union-attr]


def test_deviation_window_skips_failed_rounds_but_breaks_on_absence() -> None:
    """Failed rounds are not in the sequence; a round without the node breaks the run."""
    engine = make_engine(nodes=3, quorum=2, window_count=2, round_timeout=1.0)
    feed(engine, "r1", {A: 0.8, B: 0.8, C: 0.1})
    feed(engine, "r2", {C: 0.1})
    feed(engine, "r3", {A: 0.8, B: 0.8})
    engine.expire(1.0)
    assert engine.round("r2").status == "Failed"  # type: ignore[union-attr]
    assert engine.byzantine == {}
    feed(engine, "r4", {A: 0.8, B: 0.8, C: 0.1})
    feed(engine, "r5", {A: 0.8, B: 0.8, C: 0.1})
    assert engine.byzantine[C].round_id == "r5"


def test_late_round_can_clear_a_deviation_record() -> None:
    """A Complete round learned late inside the window breaks it: ByzantineCleared."""
    engine = make_engine(nodes=3, quorum=2, window_count=2)
    feed(engine, "r1", {A: 0.8, B: 0.8, C: 0.1})
    feed(engine, "r3", {A: 0.8, B: 0.8, C: 0.1})
    assert engine.byzantine[C].round_id == "r3"
    feed(engine, "r2", {A: 0.8, B: 0.8})
    events = engine.add_observation(signed_observation(C, "r2", 0.8), 1.0)
    assert ByzantineCleared(C) in events
    assert engine.byzantine == {}
    assert C in engine.round("r3").result.participating_nodes  # type: ignore[union-attr]


def test_conflict_wins_a_tie_with_deviation() -> None:
    """At the same round, the record's reason is ConflictingObservations."""
    engine = make_engine(nodes=3, quorum=2, window_count=1)
    feed(engine, "r1", {A: 0.8, B: 0.8, C: 0.1})
    assert engine.byzantine[C].reason == EXCESSIVE_DEVIATION
    engine.add_evidence(Evidence(*conflicting(C, "r1")), 1.0)
    record = engine.byzantine[C]
    assert (record.reason, record.round_id) == (CONFLICTING_OBSERVATIONS, "r1")
    assert record.evidence is not None


def test_pruning_keeps_the_most_recent_rounds() -> None:
    """Beyond retain_rounds, the oldest finished rounds go; Pending ones stay."""
    engine = make_engine(nodes=1, quorum=1, retain_rounds=3)
    engine.open_round("r0", 24, 0.0)  # stays Pending
    pruned: list[str] = []
    for index in range(1, 6):
        events = engine.add_observation(signed_observation(A, f"r{index}"), 0.0)
        pruned += [e.round_id for e in events if isinstance(e, RoundPruned)]
    assert pruned == ["r1", "r2", "r3"]
    assert engine.round_ids() == ["r0", "r4", "r5"]
    assert engine.open_round("r45", 24, 0.0) == [RoundOpened("r45", 24), RoundPruned("r4")]
    assert engine.open_round("a", 24, 0.0) == [RoundTooOld("a")]


def test_anti_entropy_summary_and_missing_observations() -> None:
    """Summary lists held node ids; missing_from returns only what the asker lacks."""
    engine = make_engine()
    feed(engine, "r1", {A: 0.5, B: 0.5})
    feed(engine, "r2", {A: 0.5})
    assert engine.summary(10) == {"r1": [A, B], "r2": [A]}
    assert engine.summary(1) == {"r2": [A]}
    missing = engine.observations_missing_from({"r1": [A]}, 10)
    assert [(o.round_id, o.node_id) for o in missing] == [("r1", B), ("r2", A)]
    assert engine.observations_missing_from({}, 0) == []


def test_summary_marks_rounds_holding_every_validator() -> None:
    """A round with every validator's observation is summarised as ALL_HELD, and an
    asker's ALL_HELD round gets nothing back for it (even from a responder holding
    observations of nodes it no longer counts as validators)."""
    engine = make_engine()
    feed(engine, "r1", {A: 0.5, B: 0.5, C: 0.5})
    feed(engine, "r2", {A: 0.5, B: 0.5})
    assert engine.summary(10) == {"r1": [ALL_HELD], "r2": [A, B]}
    assert engine.observations_missing_from({"r1": [ALL_HELD], "r2": [A]}, 10) == [
        engine.observation_of("r2", B)
    ]
    assert engine.observations_missing_from({"r1": [A], "r2": [ALL_HELD]}, 10) == [
        engine.observation_of("r1", B),
        engine.observation_of("r1", C),
    ]


def test_fingerprints_bring_an_equivocators_other_half_to_the_asker() -> None:
    """Asker and answerer hold every validator of r1, each a different half of C's
    equivocation: the summary alone (ALL_HELD) gets nothing back; with the asker's
    fingerprints the answerer sends its observations of r1, the asker sees the
    conflict, and once both hold the same nothing more is sent."""
    first, second = conflicting(C, "r1")
    asker, answerer = make_engine(), make_engine()
    for engine, half in ((asker, first), (answerer, second)):
        feed(engine, "r1", {A: 0.5, B: 0.5})
        engine.add_observation(half, 0.0)
    assert asker.summary(10) == answerer.summary(10) == {"r1": [ALL_HELD]}
    assert answerer.observations_missing_from(asker.summary(10), 10) == []
    sent = answerer.observations_missing_from(asker.summary(10), 10, asker.fingerprints(10))
    assert second in sent
    assert ConflictDetected in map(type, asker.add_observations(sent, 0.0))
    answerer.add_observation(first, 0.0)
    assert asker.fingerprints(10) == answerer.fingerprints(10)
    assert answerer.observations_missing_from(asker.summary(10), 10, asker.fingerprints(10)) == []


def test_fingerprints_of_a_partly_held_round() -> None:
    """The answerer compares over the nodes the asker lists: equal there, it sends only
    what the asker lacks; unable to compare (it lacks one of them), it sends what it has
    that the asker lacks, as without fingerprints."""
    asker, answerer = make_engine(), make_engine()
    feed(asker, "r1", {A: 0.5})
    feed(answerer, "r1", {A: 0.5, B: 0.5})
    prints = asker.fingerprints(10)
    assert answerer.observations_missing_from(asker.summary(10), 10, prints) == [
        answerer.observation_of("r1", B)
    ]
    assert (
        asker.observations_missing_from(answerer.summary(10), 10, answerer.fingerprints(10)) == []
    )


@settings(max_examples=200, deadline=None)
@given(
    first=st.sets(st.tuples(st.sampled_from(["r1", "r2", "r3"]), st.sampled_from([A, B, C]))),
    second=st.sets(st.tuples(st.sampled_from(["r1", "r2", "r3"]), st.sampled_from([A, B, C]))),
)
def test_one_exchange_of_summaries_makes_two_engines_hold_the_same(
    first: set[tuple[str, str]], second: set[tuple[str, str]]
) -> None:
    """Anti-entropy both ways once, whatever each held: both then hold the union."""
    engines = [make_engine(), make_engine()]
    for engine, held in zip(engines, (first, second), strict=True):
        for round_id, node in sorted(held):
            engine.add_observation(signed_observation(node, round_id), 0.0)
    one, two = engines
    to_two = one.observations_missing_from(two.summary(10), 10)
    to_one = two.observations_missing_from(one.summary(10), 10)
    for obs in to_two:
        two.add_observation(obs, 0.0)
    for obs in to_one:
        one.add_observation(obs, 0.0)
    union = first | second
    for engine in engines:
        held = {
            (r, n) for r in engine.round_ids() for n in (A, B, C) if engine.observation_of(r, n)
        }
        assert held == union
    assert one.summary(10) == two.summary(10)


def test_views_and_byzantine_mapping_are_read_only() -> None:
    """Round views are frozen snapshots and the Byzantine mapping cannot be written."""
    engine = make_engine()
    feed(engine, "r2", {A: 0.5})
    feed(engine, "r1", {A: 0.5})
    assert [view.round_id for view in engine.rounds()] == ["r1", "r2"]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        engine.rounds()[0].status = "Complete"  # type: ignore[misc]
    with pytest.raises(TypeError):
        engine.byzantine["x"] = None  # type: ignore[index]


@pytest.mark.parametrize(
    "options",
    [{"quorum": 0}, {"window_count": 0}, {"retain_rounds": 0}, {"deviation_threshold": -1.0}],
)
def test_config_rejects_nonsense(options: dict[str, float]) -> None:
    """Quorum, window and retention below 1 or a negative threshold are refused."""
    settings: dict[str, float] = {"quorum": 1, **options}
    with pytest.raises(ValueError):
        EngineConfig(frozenset({A}), **settings)  # type: ignore[arg-type]


def test_deviation_record_can_move_later() -> None:
    """A late observation that ends a deviation moves the record on; skipped rounds recount."""
    engine = make_engine(nodes=4, quorum=2, window_count=1, deviation_threshold=0.4)
    feed(engine, "r1", {A: 0.8, B: 0.8, C: 0.1})
    engine.expire(10.0)
    feed(engine, "r2", {A: 0.8, B: 0.8, C: 0.8, D: 0.8})
    feed(engine, "r3", {A: 0.8, B: 0.8, C: 0.1, D: 0.8})
    assert engine.byzantine[C].round_id == "r1"
    assert C not in engine.round("r2").result.participating_nodes  # type: ignore[union-attr]
    events = engine.add_observation(signed_observation(D, "r1", 0.1), 11.0)
    moved = [e for e in events if isinstance(e, ByzantineDetected)]
    assert len(moved) == 1 and not moved[0].first_time
    assert engine.byzantine[C].round_id == "r3"
    assert C in engine.round("r2").result.participating_nodes  # type: ignore[union-attr]
    assert C in engine.round("r1").result.participating_nodes  # type: ignore[union-attr]


def test_evidence_for_a_pruned_round_still_marks() -> None:
    """Evidence is self-certifying: a round too old to keep still yields the record."""
    engine = make_engine(nodes=1, quorum=1, retain_rounds=2)
    feed(engine, "r5", {A: 0.5})
    feed(engine, "r6", {A: 0.5})
    events = engine.add_evidence(Evidence(*conflicting(A, "r1")), 1.0)
    assert kinds(events) == [
        "RoundTooOld",
        "ConflictDetected",
        "ByzantineDetected",
        "RoundFailed",
        "RoundFailed",
    ]
    assert engine.byzantine[A].round_id == "r1"
    assert [(e.round_id, e.node_id) for e in engine.evidence()] == [("r1", A)]
