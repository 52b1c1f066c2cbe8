"""Hypothesis properties of the consensus engine with real Ed25519-signed messages.

Several independent engines receive the same messages in different orders, with
duplicates and delays; once every engine has seen everything they must agree
exactly, and agree with a brute-force model of SPEC §8 computed from the sets alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anna_trio.consensus import (
    CONFLICTING_OBSERVATIONS,
    EXCESSIVE_DEVIATION,
    ConflictDetected,
    Engine,
    EngineConfig,
    RoundResult,
    consensus_result,
)
from anna_trio.consensus.events import RoundPruned
from anna_trio.crypto import observation_digest
from anna_trio.models import Evidence, Observation
from strategies import NODE_IDS, bias_flag_sets, signed_observation

Message = Observation | Evidence

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# Few distinct values so that ties, even medians and deviations all happen often.
tis_choices = st.sampled_from([0.1, 0.2, 0.5, 0.55, 0.6, 0.9])


@attrs.frozen
class Scenario:
    config: EngineConfig
    messages: tuple[Message, ...]
    equivocations: frozenset[tuple[str, str]]  # (node, round) pairs signed twice


@st.composite
def scenarios(draw: st.DrawFn, equivocate: bool = True) -> Scenario:
    """A validator set, some rounds, honest observations and maybe equivocations."""
    size = draw(st.integers(min_value=3, max_value=5))
    validators = NODE_IDS[:size]
    config = EngineConfig(
        frozenset(validators),
        quorum=draw(st.integers(min_value=1, max_value=size)),
        deviation_threshold=draw(st.sampled_from([0.1, 0.3])),
        window_count=draw(st.integers(min_value=1, max_value=3)),
        round_timeout=10.0,
    )
    rounds = sorted(
        draw(
            st.sets(st.integers(min_value=1, max_value=20), min_size=1, max_size=5).map(
                lambda numbers: {f"round_{n:02d}" for n in numbers}
            )
        )
    )
    messages: list[Message] = []
    for round_id in rounds:
        for node in draw(st.lists(st.sampled_from(validators), unique=True)):
            tis = draw(tis_choices)
            messages.append(
                signed_observation(node, round_id, tis, bias_flags=draw(bias_flag_sets))
            )
    pairs: set[tuple[str, str]] = set()
    if equivocate:
        pairs = draw(
            st.sets(st.tuples(st.sampled_from(validators), st.sampled_from(rounds)), max_size=2)
        )
    for node, round_id in sorted(pairs):
        first = signed_observation(node, round_id, draw(tis_choices), outcome_tag="a")
        second = signed_observation(node, round_id, draw(tis_choices), outcome_tag="b")
        messages += [first, second]
        if draw(st.booleans()):
            messages.append(Evidence(first, second))
    return Scenario(config, tuple(messages), frozenset(pairs))


@st.composite
def deliveries(draw: st.DrawFn, messages: Sequence[Message]) -> list[tuple[float, Message]]:
    """Every message at least once, some twice, shuffled, at non-decreasing times."""
    extra = draw(st.lists(st.sampled_from(messages), max_size=4)) if messages else []
    order = draw(st.permutations([*messages, *extra]))
    now, timed = 0.0, []
    for message in order:
        now += draw(st.sampled_from([0.0, 0.5, 4.0, 11.0]))
        timed.append((now, message))
    return timed


def run(config: EngineConfig, timed: Sequence[tuple[float, Message]]) -> Engine:
    """Deliver the messages, expiring as time passes, then close every round.
    Observations arriving at the same instant go in as one batch (as a relay does)."""
    engine = Engine(config)
    now = 0.0
    batch: list[Observation] = []
    for at, message in timed:
        if batch and (at != now or isinstance(message, Evidence)):
            engine.add_observations(batch, now)
            batch = []
        now = at
        engine.expire(now)
        if isinstance(message, Evidence):
            engine.add_evidence(message, now)
        else:
            batch.append(message)
    engine.add_observations(batch, now)
    engine.expire(now + 1000.0)
    return engine


def snapshot(engine: Engine) -> object:
    """What must be identical on engines that hold the same messages."""
    rounds = [(v.round_id, v.status, v.result, v.observations) for v in engine.rounds()]
    records = {n: (r.reason, r.round_id) for n, r in engine.byzantine.items()}
    evidence = sorted((e.round_id, e.node_id) for e in engine.evidence())
    return rounds, records, evidence


def model(scenario: Scenario) -> tuple[dict[str, RoundResult], dict[str, tuple[str, str]]]:
    """SPEC §8 computed from the message sets alone, every round closed."""
    config = scenario.config
    seen: dict[str, dict[str, dict[str, Observation]]] = {}
    for message in scenario.messages:
        for obs in (message.first, message.second) if isinstance(message, Evidence) else [message]:
            node_obs = seen.setdefault(obs.round_id, {}).setdefault(obs.node_id, {})
            node_obs[observation_digest(obs)] = obs
    round_ids = sorted(seen)
    held = {
        r: {node: by_digest[min(by_digest)] for node, by_digest in nodes.items()}
        for r, nodes in seen.items()
    }
    conflict: dict[str, str] = {}
    for r in round_ids:
        for node, by_digest in seen[r].items():
            if len(by_digest) > 1:
                conflict.setdefault(node, r)

    complete: list[str] = []
    deviants: dict[str, set[str]] = {}
    for r in round_ids:
        kept = [o for n, o in held[r].items() if not (n in conflict and conflict[n] <= r)]
        if len(kept) >= config.quorum:
            complete.append(r)
            median = statistics.median(o.tis_overall for o in kept)
            deviants[r] = {
                o.node_id for o in kept if abs(o.tis_overall - median) > config.deviation_threshold
            }
    deviation: dict[str, str] = {}
    window = config.window_count
    for end in range(window - 1, len(complete)):
        holders = set.intersection(*(deviants[r] for r in complete[end - window + 1 : end + 1]))
        for node in holders:
            deviation.setdefault(node, complete[end])

    records: dict[str, tuple[str, str]] = {}
    for node in set(conflict) | set(deviation):
        options = []
        if node in conflict:
            options.append((conflict[node], 0, CONFLICTING_OBSERVATIONS))
        if node in deviation:
            options.append((deviation[node], 1, EXCESSIVE_DEVIATION))
        round_id, _, reason = min(options)
        records[node] = (reason, round_id)
    results = {}
    for r in round_ids:
        counted = [
            (o, observation_digest(o))
            for n, o in held[r].items()
            if not (n in records and records[n][1] <= r)
        ]
        results[r] = consensus_result(counted, config.quorum)
        if counted:
            expected = statistics.median(o.tis_overall for o, _ in counted)
            assert results[r].consensus_tis == expected
    return results, records


@PROPERTY_SETTINGS
@given(data=st.data(), scenario=scenarios())
def test_engines_converge_whatever_the_delivery(data: st.DataObject, scenario: Scenario) -> None:
    """Any order, duplication and delay: identical results, statuses, records, evidence."""
    engines = [
        run(scenario.config, data.draw(deliveries(scenario.messages), label=f"engine {i}"))
        for i in range(3)
    ]
    first = snapshot(engines[0])
    for other in engines[1:]:
        assert snapshot(other) == first


@PROPERTY_SETTINGS
@given(data=st.data(), scenario=scenarios())
def test_engine_matches_the_model(data: st.DataObject, scenario: Scenario) -> None:
    """The incremental engine equals SPEC §8 recomputed from the sets from scratch."""
    engine = run(scenario.config, data.draw(deliveries(scenario.messages)))
    results, records = model(scenario)
    assert {n: (r.reason, r.round_id) for n, r in engine.byzantine.items()} == records
    assert {v.round_id: v.result for v in engine.rounds()} == results
    for view in engine.rounds():
        expected = (
            "Complete" if len(view.result.participating_nodes) >= view.required_quorum else "Failed"
        )
        assert view.status == expected
        # The cheap accessors the node uses on its hot path agree with the views.
        assert engine.status_of(view.round_id) == view.status
        for obs in view.observations:
            assert engine.observation_of(view.round_id, obs.node_id) == obs
    views = engine.rounds()
    assert engine.recent_windows(len(views)) == [(v.round_id, v.window_hours) for v in views]


@PROPERTY_SETTINGS
@given(data=st.data(), scenario=scenarios())
def test_equivocation_is_always_detected(data: st.DataObject, scenario: Scenario) -> None:
    """Every engine that sees both halves, or the evidence, marks the node from that round."""
    timed = data.draw(deliveries(scenario.messages))
    engine = run(scenario.config, timed)
    for node, round_id in scenario.equivocations:
        record = engine.byzantine[node]
        assert record.round_id <= round_id
        if record.reason == CONFLICTING_OBSERVATIONS:
            assert record.evidence is not None and record.evidence.node_id == node
        assert (round_id, node) in {(e.round_id, e.node_id) for e in engine.evidence()}
    evidence_only = [(t, m) for t, m in timed if isinstance(m, Evidence)]
    lone = run(scenario.config, evidence_only)
    for message in (m for _, m in evidence_only):
        assert message.node_id in lone.byzantine


@PROPERTY_SETTINGS
@given(data=st.data(), scenario=scenarios(equivocate=False))
def test_duplicates_are_never_flagged(data: st.DataObject, scenario: Scenario) -> None:
    """Honest messages delivered any number of times never raise a conflict."""
    engine = Engine(scenario.config)
    for now, message in data.draw(deliveries(scenario.messages)):
        assert isinstance(message, Observation)
        for _ in range(2):
            events = engine.add_observation(message, now)
            assert not any(isinstance(e, ConflictDetected) for e in events)
    assert all(r.reason != CONFLICTING_OBSERVATIONS for r in engine.byzantine.values())
    assert engine.evidence() == []


@settings(max_examples=30, deadline=None)
@given(
    retain=st.integers(min_value=1, max_value=6),
    numbers=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=25),
)
def test_pruning_bounds_memory(retain: int, numbers: list[int]) -> None:
    """With finished rounds, the engine never holds more than retain_rounds rounds."""
    engine = Engine(EngineConfig(frozenset(NODE_IDS[:1]), 1, retain_rounds=retain))
    for number in numbers:
        engine.add_observation(signed_observation(NODE_IDS[0], f"round_{number:02d}"), 0.0)
        assert len(engine.round_ids()) <= retain
        assert engine.next_deadline() is None
    kept = engine.round_ids()
    assert kept == sorted(kept)
    assert kept[-1] == f"round_{max(numbers):02d}"


@st.composite
def retention_steps(draw: st.DrawFn) -> list[tuple[str, str, float]]:
    """(what, round id, time): rounds opened bare (as a start or a push names them),
    rounds observed by a validator, and clock ticks that close Pending rounds."""
    round_ids = st.sampled_from([f"r{n:02d}" for n in range(30)] + ["zzzz_0", "zzzz_1", "a0"])
    step = st.tuples(st.sampled_from(["open", "observe", "tick"]), round_ids)
    return [
        (what, round_id, float(i))
        for i, (what, round_id) in enumerate(draw(st.lists(step, max_size=80)))
    ]


@given(steps=retention_steps(), capacity=st.integers(min_value=1, max_value=6))
@settings(max_examples=150, deadline=None)
def test_rounds_nobody_joined_never_push_out_rounds_validators_joined(
    steps: list[tuple[str, str, float]], capacity: int
) -> None:
    """Retention (README): a finished round holding no observation goes before any round
    holding one; a Pending round is never dropped."""
    engine = Engine(
        EngineConfig(frozenset(NODE_IDS[:3]), quorum=2, round_timeout=3.0, retain_rounds=capacity)
    )
    for what, round_id, now in steps:
        before = {view.round_id: view for view in engine.rounds()}
        if what == "open":
            events = engine.open_round(round_id, 24, now)
        elif what == "observe":
            events = engine.add_observation(signed_observation(NODE_IDS[0], round_id), now)
        else:
            events = engine.expire(now)
        pruned = [e.round_id for e in events if isinstance(e, RoundPruned)]
        for gone in pruned:
            view = before.get(gone)
            if view is None:
                continue  # opened and dropped in this very step
            assert view.status != "Pending"
            if view.observations:
                bare = [v for v in engine.rounds() if not v.observations and v.status != "Pending"]
                assert bare == [], (gone, [v.round_id for v in bare])
