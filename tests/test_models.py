"""Observation wire form and the values crypto memoises on an observation."""

from __future__ import annotations

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from anna_trio import crypto
from anna_trio.models import Observation, parse_observation
from strategies import node_key, observations


@settings(max_examples=200, deadline=None)
@given(obs=observations())
def test_wire_form_round_trips_and_memo_changes_nothing(obs: Observation) -> None:
    """to_dict -> parse gives an equal observation, whether or not its signed bytes and
    digest were computed (and memoised) first; memoised values equal fresh ones."""
    fresh = parse_observation(obs.to_dict())
    assert fresh == obs and hash(fresh) == hash(obs)
    digest = crypto.observation_digest(obs)
    assert crypto.observation_digest(obs) is digest  # kept, not recomputed
    assert parse_observation(obs.to_dict()) == obs
    assert crypto.observation_digest(fresh) == digest
    # A newly parsed copy has nothing memoised: its bytes are built from its fields.
    assert crypto.observation_message(parse_observation(obs.to_dict())) == (
        crypto.observation_message(obs)
    )


@settings(max_examples=100, deadline=None)
@given(obs=observations(), tis=st.floats(min_value=0.0, max_value=1.0))
def test_a_changed_copy_gets_its_own_message(obs: Observation, tis: float) -> None:
    """A copy with another value (attrs.evolve) never reuses the original's memoised
    bytes: it fails verification unless the value is unchanged at six decimals."""
    public_key = node_key(obs.node_id).public_key()
    assert crypto.verify_observation(obs, public_key)
    changed = attrs.evolve(obs, tis_overall=round(tis, 6))
    same = f"{changed.tis_overall:.6f}" == f"{obs.tis_overall:.6f}"
    assert crypto.verify_observation(changed, public_key) is same
    assert (crypto.observation_digest(changed) == crypto.observation_digest(obs)) is same
