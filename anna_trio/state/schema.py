"""State schema v1 and v2 (SPEC §5): parsing, validation and conversion. Pure, no I/O.

v1 is an object with ``system_state`` and any other fields; v2 keeps every v1 field
verbatim (only ``schema_version`` changes) and adds the seed's v2 fields. A field of
v1 that v2 also defines wins over the default, so nothing from v1 is ever lost.
"""

from __future__ import annotations

import json
from typing import Any

from .._exceptions import StateError

CURRENT_VERSION = 2
MIGRATION_FIELD = "migration"  # bookkeeping the migration adds to the v2 document
V2_REQUIRED = (
    "schema_version",
    "node_id",
    "created_at",
    "updated_at",
    "system_state",
    "last_boot_time",
    "configuration_hash",
    "consensus",
    "network",
)
CONSENSUS_REQUIRED = (
    "validator_count",
    "rounds_completed",
    "last_round_id",
    "last_round_at",
    "byzantine_nodes",
)
NETWORK_REQUIRED = ("peer_count", "last_peer_reload", "tls_enabled")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_state(raw: bytes) -> dict[str, Any]:
    """Decode state.json; StateError when it is not a v1 or v2 state this code can read."""
    try:
        state = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateError(f"state is not valid JSON: {exc}") from exc
    if not isinstance(state, dict):
        raise StateError("state is not a JSON object")
    version = state_version(state)
    if version == 1:
        _validate_v1(state)
    else:
        validate_v2(state)
    return state


def state_version(state: dict[str, Any]) -> int:
    """1 or 2; StateError for anything else (a newer schema is never guessed at)."""
    version = state.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise StateError(f"schema_version {version!r} is not an integer")
    if version > CURRENT_VERSION:
        raise StateError(
            f"state has schema_version {version}, newer than this build understands "
            f"({CURRENT_VERSION}); refusing to touch it"
        )
    if version < 1:
        raise StateError(f"schema_version {version} is not valid")
    return version


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_v1(state: dict[str, Any]) -> None:
    if not isinstance(state.get("system_state"), str):
        raise StateError("v1 state has no system_state string")
    last = state.get("last_audit_id")
    if last is not None and (not _is_int(last) or last < 0):
        raise StateError(f"v1 last_audit_id {last!r} is not a non-negative integer")


def validate_v2(state: dict[str, Any]) -> None:
    """StateError listing every missing or mistyped v2 field."""
    problems = [f"missing {key}" for key in V2_REQUIRED if key not in state]
    if state.get("schema_version") != CURRENT_VERSION:
        problems.append("schema_version is not 2")
    for key in ("node_id", "created_at", "updated_at", "system_state"):
        if key in state and not isinstance(state[key], str):
            problems.append(f"{key} is not a string")
    for section, required in (("consensus", CONSENSUS_REQUIRED), ("network", NETWORK_REQUIRED)):
        value = state.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            problems.append(f"{section} is not an object")
            continue
        problems.extend(f"missing {section}.{key}" for key in required if key not in value)
    consensus = state.get("consensus")
    if isinstance(consensus, dict) and not isinstance(consensus.get("byzantine_nodes", []), list):
        problems.append("consensus.byzantine_nodes is not a list")
    last = state.get("last_audit_id")
    if last is not None and (not _is_int(last) or last < 0):
        problems.append("last_audit_id is not a non-negative integer")
    if problems:
        raise StateError("invalid v2 state: " + "; ".join(problems))


def _defaults(*, node_id: str, now: str) -> dict[str, Any]:
    return {
        "schema_version": CURRENT_VERSION,
        "node_id": node_id,
        "created_at": now,
        "updated_at": now,
        "system_state": "configured",
        "last_boot_time": now,
        "configuration_hash": None,
        "consensus": {
            "validator_count": 0,
            "rounds_completed": 0,
            "last_round_id": None,
            "last_round_at": None,
            "byzantine_nodes": [],
        },
        "network": {"peer_count": 0, "last_peer_reload": None, "tls_enabled": False},
    }


def new_v2_state(*, node_id: str, now: str) -> dict[str, Any]:
    """A fresh v2 state for a node that never had one."""
    return _defaults(node_id=node_id, now=now)


def convert_v1_to_v2(v1: dict[str, Any], *, node_id: str, now: str) -> dict[str, Any]:
    """v2 = v1 verbatim (schema_version set to 2) plus any v2 field v1 lacks.

    A v1 ``consensus``/``network`` object is kept and only completed with missing keys;
    a v1 field of the same name that is not an object cannot become v2 (StateError).
    ``v1`` is not modified, but v2 shares its nested values (no deep copy: the migration
    budget is a few milliseconds), so deep-copy the result before mutating it in place.
    """
    if MIGRATION_FIELD in v1:
        raise StateError(f"v1 state already has a {MIGRATION_FIELD!r} field; refusing to guess")
    v2 = dict(v1)
    v2["schema_version"] = CURRENT_VERSION
    for key, default in _defaults(node_id=node_id, now=now).items():
        if key not in v2:
            v2[key] = default
        elif isinstance(default, dict):
            if not isinstance(v2[key], dict):
                raise StateError(f"v1 field {key!r} is not an object and cannot become v2's")
            completed = dict(v2[key])
            for sub_key, sub_default in default.items():
                completed.setdefault(sub_key, sub_default)
            v2[key] = completed
    validate_v2(v2)
    return v2


def encode_state(state: dict[str, Any]) -> bytes:
    """How state files are written: UTF-8 JSON on one line (`jq .` pretty-prints it).

    No indent: that keeps json's C encoder, about ten times faster on a 10 KB state.
    """
    return (json.dumps(state, ensure_ascii=False, allow_nan=False) + "\n").encode()
