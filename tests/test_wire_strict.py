"""Node-to-node messages are strict: wire.py's parsers refuse an unknown key, a bool or
a string where an integer is wanted, and NaN, with a 422 MessageError that names the
path of each problem. The items a batch or a sync question carries are lenient by
design (one bad item does not cost the batch): a bad one is left out, never coerced.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from anna_trio import wire
from anna_trio.converter import Location, format_path
from anna_trio.models import Evidence, Observation
from anna_trio.wire import MessageError, RoundRef, SyncAnswer, structure_body
from strategies import signed_observation

OBSERVATION = signed_observation("node_001", "round_001").to_dict()
OTHER = signed_observation("node_001", "round_001", 0.5).to_dict()
ROUND = {"round_id": "round_001", "window_hours": 24}
EVIDENCE = {"first": OBSERVATION, "second": OTHER}

PARSERS: dict[str, Callable[[Any], object]] = {
    "batch": wire.parse_batch,
    "gossip_answer": wire.parse_gossip_answer,
    "sync_request": wire.parse_sync_request,
    "round": lambda body: structure_body(body, RoundRef),
    "observation": lambda body: structure_body(body, Observation),
    "evidence": lambda body: structure_body(body, Evidence),
    "sync_answer": lambda body: structure_body(body, SyncAnswer),
}
"""Every message a node structures from a peer's JSON, by name."""

BODIES: dict[str, dict[str, Any]] = {
    "batch": {
        "from": "node_001",
        "rounds": [ROUND],
        "observations": [OBSERVATION],
        "evidence": [EVIDENCE],
        "more": False,
    },
    "gossip_answer": {
        "success": True,
        "accepted": 1,
        "duplicate": 0,
        "rejected": 0,
        "observations": [OBSERVATION],
    },
    "sync_request": {
        "from": "node_002",
        "summary": {"round_001": ["node_001"]},
        "fingerprints": {"round_001": "ab" * 16},
        "evidence": [["node_003", "round_001"]],
    },
    "round": ROUND,
    "observation": OBSERVATION,
    "evidence": EVIDENCE,
    "sync_answer": {
        "rounds": [ROUND],
        "observations": [OBSERVATION],
        "evidence": [EVIDENCE],
        "more": True,
    },
}
"""A valid body of each message, with every key it may hold."""

Field = tuple[str, Location]

MAPPINGS: list[Field] = [
    ("batch", ()),
    ("gossip_answer", ()),
    ("sync_request", ()),
    ("round", ()),
    ("observation", ()),
    ("observation", ("tis_components",)),
    ("evidence", ()),
    ("evidence", ("first",)),
    ("evidence", ("second", "tis_components")),
    ("sync_answer", ()),
    ("sync_answer", ("rounds", 0)),
    ("sync_answer", ("observations", 0)),
    ("sync_answer", ("evidence", 0, "second")),
]
"""The strict mappings of each message (a batch's observations stay raw: the node
judges each one)."""

INTEGERS: list[Field] = [
    ("gossip_answer", ("accepted",)),
    ("gossip_answer", ("duplicate",)),
    ("gossip_answer", ("rejected",)),
    ("round", ("window_hours",)),
    ("observation", ("audit_id",)),
    ("observation", ("window_hours",)),
    ("evidence", ("second", "audit_id")),
    ("sync_answer", ("rounds", 0, "window_hours")),
    ("sync_answer", ("observations", 0, "audit_id")),
]
BOOLS: list[Field] = [
    ("batch", ("more",)),
    ("gossip_answer", ("success",)),
    ("sync_answer", ("more",)),
]
NUMBERS: list[Field] = [
    ("observation", ("tis_overall",)),
    ("observation", ("tis_components", "ethical_alignment")),
    ("evidence", ("first", "tis_overall")),
    ("sync_answer", ("evidence", 0, "first", "tis_components", "coherence_stability")),
]
STRINGS: list[Field] = [
    ("batch", ("from",)),
    ("sync_request", ("from",)),
    ("sync_request", ("summary", "round_001", 0)),
    ("sync_request", ("fingerprints", "round_001")),
    ("observation", ("node_id",)),
    ("evidence", ("first", "signature")),
]


def value_at(body: Any, path: Location) -> Any:
    for part in path:
        body = body[part]
    return body


def body_with(kind: str, path: Location, value: Any) -> dict[str, Any]:
    """A copy of the valid body of `kind` with `value` at `path` (the last part may be
    a new key)."""
    body = copy.deepcopy(BODIES[kind])
    value_at(body, path[:-1])[path[-1]] = value
    return body


def refused(kind: str, body: Any) -> MessageError:
    with pytest.raises(MessageError) as caught:
        PARSERS[kind](body)
    error = caught.value
    assert (error.status, error.code) == (422, "invalid_request")
    return error


def assert_named(error: MessageError, path: Location, words: str) -> None:
    """`error` has a problem at `path` whose message starts with `words`, and its text
    names the path."""
    found = [(problem.path, problem.message) for problem in error.problems]
    assert any(at == path and message.startswith(words) for at, message in found), found
    assert f"{format_path(path)}: {words}" in str(error)


@pytest.mark.parametrize("kind", BODIES)
def test_the_valid_bodies_parse(kind: str) -> None:
    """The bodies the tests below spoil are valid as they are."""
    PARSERS[kind](copy.deepcopy(BODIES[kind]))


BAD_VALUES: list[tuple[str, Location, Any, str]] = [
    ("batch", ("sent_at",), 1, "unknown key (allowed: evidence, from, more, observations"),
    ("batch", ("malformed_rounds",), 0, "unknown key"),  # the count the parser adds
    ("batch", ("more",), math.nan, "must be true or false"),
    ("batch", ("more",), 1, "must be true or false"),
    ("gossip_answer", ("ok",), True, "unknown key"),
    ("gossip_answer", ("accepted",), True, "must be an integer"),
    ("gossip_answer", ("rejected",), "2", "must be an integer"),
    ("gossip_answer", ("duplicate",), math.nan, "must be an integer"),
    ("sync_request", ("since",), 0, "unknown key"),
    ("sync_request", ("summary", "round_001", 0), True, "must be a non-empty string"),
    ("sync_request", ("fingerprints", "round_001"), math.nan, "must be a non-empty string"),
    ("round", ("window_hours",), True, "must be an integer 1..8760"),
    ("round", ("window_hours",), "24", "must be an integer 1..8760"),
    ("observation", ("tis_components", "recency"), 0.5, "unknown key"),
    ("observation", ("audit_id",), True, "must be an integer"),
    ("observation", ("window_hours",), "24", "must be an integer 1..8760"),
    ("observation", ("tis_overall",), math.nan, "must be a finite number"),
    ("observation", ("tis_overall",), "0.5", "must be a finite number in [0, 1]"),
    ("evidence", ("first", "comment"), "x", "unknown key"),
    ("evidence", ("second", "tis_components", "ethical_alignment"), math.inf, "must be a finite"),
    ("sync_answer", ("observations", 0, "audit_id"), False, "must be an integer"),
    ("sync_answer", ("rounds", 0, "window_hours"), "24", "must be an integer 1..8760"),
]


@pytest.mark.parametrize(
    ("kind", "path", "value", "words"),
    BAD_VALUES,
    ids=[f"{kind}:{format_path(path)}={value!r}" for kind, path, value, _ in BAD_VALUES],
)
def test_a_bad_value_is_refused_with_its_path(
    kind: str, path: Location, value: Any, words: str
) -> None:
    """An unknown key, a bool or a string for an integer, NaN: 422, the path named."""
    assert_named(refused(kind, body_with(kind, path, value)), path, words)


@given(st.sampled_from(MAPPINGS), st.text(min_size=1))
def test_any_unknown_key_is_refused(mapping: Field, key: str) -> None:
    """A key a message does not define is refused wherever it is, by its path."""
    kind, at = mapping
    assume(key not in value_at(BODIES[kind], at))
    assert_named(refused(kind, body_with(kind, (*at, key), 1)), (*at, key), "unknown key")


not_integers = st.one_of(st.booleans(), st.integers().map(str), st.floats(), st.none(), st.text())
not_bools = st.one_of(st.integers(), st.text(), st.floats(), st.none())
not_numbers = st.one_of(
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False).map(str),
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf]),
    st.just(10**400),  # inf as a float
)
not_strings = st.one_of(st.booleans(), st.integers(), st.floats(), st.just(""))


WRONG_TYPES = [
    # (fields of the type, values that are not of it, what the refusal says)
    (INTEGERS, not_integers, "must be an integer"),  # no bool, numeric string or float
    (BOOLS, not_bools, "must be true or false"),  # 0, 1, "true" and NaN are no bools
    (NUMBERS, not_numbers, "must be a finite number"),  # nor NaN, infinities, strings
    (STRINGS, not_strings, "must be"),  # no number, bool or empty string
]


@given(st.data())
@pytest.mark.parametrize(("fields", "wrong", "says"), WRONG_TYPES)
def test_only_a_value_of_the_field_s_type_passes(
    fields: list[Field], wrong: st.SearchStrategy[Any], says: str, data: st.DataObject
) -> None:
    """Where a message wants an integer, a bool, a finite number or a string, anything
    else is refused, named by its path."""
    kind, path = data.draw(st.sampled_from(fields))
    value = data.draw(wrong)
    assert_named(refused(kind, body_with(kind, path, value)), path, says)


@pytest.mark.parametrize("value", [True, "24", 24.0, math.nan])
def test_a_bad_round_item_is_left_out_not_coerced(value: Any) -> None:
    """A pushed round whose window_hours is no integer is dropped and counted."""
    batch = wire.parse_batch(body_with("batch", ("rounds", 0, "window_hours"), value))
    assert (batch.rounds, batch.malformed_rounds) == ((), 1)


@pytest.mark.parametrize("value", [True, 7, math.nan, ""])
def test_a_bad_evidence_key_is_left_out_not_coerced(value: Any) -> None:
    """A sync question's evidence key that is no pair of strings is left out."""
    request = wire.parse_sync_request(body_with("sync_request", ("evidence", 0, 1), value))
    assert request.known_evidence == frozenset()
