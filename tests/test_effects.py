"""What a batch of engine events means for the node (effects.py), over any batch."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from anna_trio.consensus import COMPLETE, PENDING, consensus_result
from anna_trio.consensus import events as ev
from anna_trio.effects import Broadcast, effects_of
from anna_trio.models import Evidence
from strategies import signed_observation

NODE = "node_001"
ROUNDS = ["r1", "r2", "r3"]
RESULT = consensus_result((), 1)
TIS_RESULT = consensus_result(
    [(signed_observation("node_002", "r1"), "d")], 1
)  # a result with a consensus TIS

rounds = st.sampled_from(ROUNDS)
nodes = st.sampled_from([NODE, "node_002", "node_003"])
observations = st.builds(signed_observation, nodes, rounds)


def evidence_for(node: str, round_id: str) -> Evidence:
    return Evidence(signed_observation(node, round_id, tis=0.1), signed_observation(node, round_id))


records = st.builds(
    lambda node, round_id: ev.ByzantineRecord(node, "ConflictingObservations", round_id, 0.0, None),
    nodes,
    rounds,
)
events = st.one_of(
    st.builds(ev.RoundOpened, rounds, st.integers(1, 48)),
    st.builds(ev.RoundPruned, rounds),
    st.builds(ev.Accepted, observations),
    st.builds(ev.Duplicate, observations),
    st.builds(ev.NotAValidator, observations),
    st.builds(ev.ConflictDetected, st.builds(evidence_for, nodes, rounds)),
    st.builds(ev.ByzantineDetected, records, st.booleans()),
    st.builds(ev.ByzantineCleared, nodes),
    st.builds(
        ev.RoundCompleted,
        rounds,
        st.sampled_from([RESULT, TIS_RESULT]),
        st.booleans(),
        st.floats(0, 9),
    ),
    st.builds(ev.ResultChanged, rounds, st.sampled_from([RESULT, TIS_RESULT])),
    st.builds(ev.RoundFailed, rounds),
)


@given(
    batch=st.lists(events, max_size=30),
    relaying=st.sets(rounds),
    statuses=st.fixed_dictionaries(
        {r: st.sampled_from([PENDING, COMPLETE, "Failed"]) for r in ROUNDS}
    ),
)
def test_every_event_means_exactly_its_rows_audits_broadcasts_and_counts(
    batch: list[ev.Event], relaying: set[str], statuses: dict[str, str]
) -> None:
    out = effects_of(
        batch, node_id=NODE, relaying=relaying, learned_at=12.5, status_of=statuses.get
    )
    kinds = Counter(type(e) for e in batch)
    others_accepted = [e.obs for e in batch if isinstance(e, ev.Accepted) and e.obs.node_id != NODE]
    conflicts = [e.evidence for e in batch if isinstance(e, ev.ConflictDetected)]

    assert len(out.statements) == kinds[ev.RoundOpened] + len(others_accepted) + len(conflicts)
    assert [s for s in out.statements if s[0].startswith("INSERT OR IGNORE INTO rounds")] == [
        ("INSERT OR IGNORE INTO rounds VALUES (?, ?, ?)", (e.round_id, e.window_hours, 12.5))
        for e in batch
        if isinstance(e, ev.RoundOpened)
    ]
    first_marks = [e.record for e in batch if isinstance(e, ev.ByzantineDetected) and e.first_time]
    assert [a.fields["byzantine_node"] for a in out.audits] == [r.node_id for r in first_marks]
    assert {a.event for a in out.audits} <= {"byzantine_detected"}
    assert [b.kind for b in out.broadcasts] == ["evidence"] * len(conflicts)
    assert all(isinstance(b, Broadcast) and not b.exclude for b in out.broadcasts)
    assert (
        out.observation_results
        == Counter(
            {
                "accepted": kinds[ev.Accepted],
                "duplicate": kinds[ev.Duplicate],
                "unknown_node": kinds[ev.NotAValidator],
                "conflict": kinds[ev.ConflictDetected],
            }
        )
        - Counter()
    )
    assert out.sign == [
        (e.round_id, e.window_hours) for e in batch if isinstance(e, ev.RoundOpened)
    ]
    assert out.relay == [obs for obs in others_accepted if obs.round_id in relaying]
    assert out.completed_durations == [
        e.duration for e in batch if isinstance(e, ev.RoundCompleted) and e.first_time
    ]
    assert out.rounds_failed == kinds[ev.RoundFailed]
    assert out.forget == [e.round_id for e in batch if isinstance(e, ev.RoundPruned)]
    closing = {e.round_id for e in batch if isinstance(e, ev.RoundCompleted | ev.RoundFailed)}
    late_relays = {obs.round_id for obs in out.relay if statuses[obs.round_id] != PENDING}
    assert set(out.release_relays) == closing | late_relays
    marks = kinds[ev.ByzantineDetected] + kinds[ev.ByzantineCleared]
    assert out.byzantine_changed == bool(marks)
    assert out.state_dirty == bool(marks or kinds[ev.RoundCompleted])
    assert out.durable == bool(out.statements or out.audits or out.broadcasts)


def test_the_average_tis_follows_complete_rounds_only() -> None:
    batch: list[ev.Event] = [
        ev.RoundCompleted("r1", TIS_RESULT, True, 1.0),
        ev.ResultChanged("r2", TIS_RESULT),
        ev.ResultChanged("r3", TIS_RESULT),
        ev.RoundCompleted("r3", RESULT, False, 1.0),  # no consensus TIS: nothing to average
    ]
    statuses = {"r1": COMPLETE, "r2": COMPLETE, "r3": "Failed"}
    out = effects_of(batch, node_id=NODE, relaying=(), learned_at=0.0, status_of=statuses.get)
    assert [r for r, _ in out.completed_tis] == ["r1", "r2"]
