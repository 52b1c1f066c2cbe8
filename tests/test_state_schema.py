"""State schema v1/v2 (SPEC §5), the state-dir lock and the kept-current file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from anna_trio._exceptions import LockHeldError, StateError
from anna_trio.durable import atomic_write_bytes
from anna_trio.state.lock import StateDirLock
from anna_trio.state.schema import (
    V2_REQUIRED,
    convert_v1_to_v2,
    encode_state,
    new_v2_state,
    parse_state,
    state_version,
    validate_v2,
)
from anna_trio.state.statefile import StateFile
from state_strategies import v1_states

NOW = "2025-11-12T12:00:00Z"


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"{}", "system_state"),
        (b'{"system_state": "x", "schema_version": 3}', "newer"),
        (b'{"system_state": "x", "schema_version": "1"}', "not an integer"),
        (b'{"system_state": "x", "schema_version": 0}', "not valid"),
        (b'{"system_state": "x", "last_audit_id": -1}', "last_audit_id"),
        (b'{"system_state": "x", "last_audit_id": NaN}', "not valid JSON"),
        (b'{"schema_version": 2, "system_state": "x"}', "missing node_id"),
    ],
)
def test_parse_state_rejects_what_it_cannot_read(raw: bytes, match: str) -> None:
    """Unparseable, non-object, too-new or invalid state is StateError (exit 65)."""
    with pytest.raises(StateError, match=match) as caught:
        parse_state(raw)
    assert caught.value.exit_code == 65


def test_state_version_defaults_to_one() -> None:
    """A state without schema_version is v1."""
    assert state_version({"system_state": "x"}) == 1
    assert state_version(new_v2_state(node_id="n", now=NOW)) == 2


def test_new_v2_state_has_every_seed_field() -> None:
    """A fresh v2 document carries all fields of the seed's v2 schema."""
    state = new_v2_state(node_id="node_001", now=NOW)
    validate_v2(state)
    assert set(V2_REQUIRED) <= set(state)
    assert state["consensus"]["byzantine_nodes"] == []
    assert state["network"]["tls_enabled"] is False
    assert parse_state(encode_state(state)) == state


def test_validate_v2_lists_every_missing_field() -> None:
    """validate_v2 names all missing fields, nested ones included."""
    state = new_v2_state(node_id="n", now=NOW)
    del state["created_at"]
    del state["network"]["tls_enabled"]
    with pytest.raises(StateError) as caught:
        validate_v2(state)
    assert "missing created_at" in str(caught.value)
    assert "missing network.tls_enabled" in str(caught.value)


@settings(max_examples=80)
@given(v1=v1_states())
def test_convert_keeps_every_v1_field_verbatim(v1: dict[str, Any]) -> None:
    """Every v1 field (unknown ones too) survives into v2 unchanged; the result is valid v2."""
    v2 = convert_v1_to_v2(v1, node_id="node_001", now=NOW)
    validate_v2(v2)
    for key, value in v1.items():
        if key != "schema_version":
            assert v2[key] == value
    assert v2["schema_version"] == 2
    assert parse_state(encode_state(v2)) == v2


def test_convert_completes_a_partial_v1_consensus_object() -> None:
    """A v1 consensus object is kept and only completed with the keys it lacks."""
    v1 = {"system_state": "x", "consensus": {"rounds_completed": 7, "extra": 1}}
    v2 = convert_v1_to_v2(v1, node_id="n", now=NOW)
    assert v2["consensus"]["rounds_completed"] == 7
    assert v2["consensus"]["extra"] == 1
    assert v2["consensus"]["validator_count"] == 0


@pytest.mark.parametrize(
    "v1", [{"system_state": "x", "network": "lan"}, {"system_state": "x", "migration": 1}]
)
def test_convert_refuses_v1_fields_that_cannot_become_v2(v1: dict[str, Any]) -> None:
    """A v1 field that clashes with v2's structure is StateError, never silently replaced."""
    with pytest.raises(StateError):
        convert_v1_to_v2(v1, node_id="n", now=NOW)


def test_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    """A second lock on the same state dir fails with exit 78 naming the holder's pid."""
    with StateDirLock(tmp_path):
        with pytest.raises(LockHeldError) as caught:
            StateDirLock(tmp_path).acquire()
        assert f"(pid {os.getpid()})" in str(caught.value)
        assert str(tmp_path) in str(caught.value)
        assert caught.value.exit_code == 78
    with StateDirLock(tmp_path):
        pass  # released: can be taken again


def test_statefile_update_is_atomic_and_stamps_updated_at(tmp_path: Path) -> None:
    """update applies changes, sets updated_at and rewrites state.json as valid v2."""
    atomic_write_bytes(tmp_path / "state.json", encode_state(new_v2_state(node_id="n", now=NOW)))
    state = StateFile.load(tmp_path, now=lambda: "2030-01-01T00:00:00Z")

    def complete_round(doc: dict[str, Any]) -> None:
        doc["consensus"]["rounds_completed"] += 1
        doc["consensus"]["last_round_id"] = "round_001"

    state.update(complete_round)
    on_disk = json.loads((tmp_path / "state.json").read_bytes())
    assert on_disk["consensus"]["rounds_completed"] == 1
    assert on_disk["updated_at"] == "2030-01-01T00:00:00Z"
    assert state.data == on_disk
    assert len((tmp_path / "state.json").read_bytes()) <= 10 * 1024


def test_statefile_rejects_invalid_updates_and_v1(tmp_path: Path) -> None:
    """An update that breaks the schema writes nothing; a v1 file cannot be loaded."""
    atomic_write_bytes(tmp_path / "state.json", encode_state(new_v2_state(node_id="n", now=NOW)))
    before = (tmp_path / "state.json").read_bytes()
    state = StateFile.load(tmp_path)
    with pytest.raises(StateError):
        state.update(lambda doc: doc.pop("network"))
    assert (tmp_path / "state.json").read_bytes() == before
    assert "network" in state.data
    (tmp_path / "state.json").write_bytes(b'{"system_state": "x"}')
    with pytest.raises(StateError, match="v1"):
        StateFile.load(tmp_path)
