"""Hypothesis strategies for v1 state documents (SPEC §5), shared by the state tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from anna_trio.state.schema import CONSENSUS_REQUIRED, NETWORK_REQUIRED, V2_REQUIRED

# Names v2 gives a structure to, or the migration's own bookkeeping: a v1 "unknown"
# field must not collide with them for the v1 to be convertible.
_RESERVED = {*V2_REQUIRED, "migration", "last_audit_id", *CONSENSUS_REQUIRED, *NETWORK_REQUIRED}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
unknown_keys = st.text(min_size=1, max_size=12).filter(lambda key: key not in _RESERVED)


@st.composite
def v1_states(draw: st.DrawFn) -> dict[str, Any]:
    """A v1 state: system_state, optional known fields, arbitrary unknown fields."""
    state: dict[str, Any] = draw(st.dictionaries(unknown_keys, json_values, max_size=6))
    state["system_state"] = draw(st.sampled_from(["configured", "running", "degraded"]))
    if draw(st.booleans()):
        state["schema_version"] = 1
    if draw(st.booleans()):
        state["last_audit_id"] = draw(st.integers(0, 10**6))
    if draw(st.booleans()):
        state["last_boot_time"] = "2025-11-01T00:00:00Z"
    if draw(st.booleans()):
        state["configuration_hash"] = "abc123"
    return state
