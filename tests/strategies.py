"""Shared test helpers and hypothesis strategies: real Ed25519-signed observations.

Keys are derived from fixed seeds and cached, so signing is the only crypto cost
and every run sees the same key per node id.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from anna_trio.crypto import public_key_hex, sign_observation
from anna_trio.models import Observation, ObservationContent, TisComponents

NODE_IDS = tuple(f"node_{index:03d}" for index in range(1, 16))
BIAS_FLAGS = ("RecencyBias", "ConfirmationBias", "AnchoringBias", "Overconfidence")
TIMESTAMP = "2025-11-12T12:00:00Z"


@functools.cache
def node_key(node_id: str) -> Ed25519PrivateKey:
    """The private key of a test node, derived from its id."""
    seed = hashlib.sha256(f"anna-trio-test-key|{node_id}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def node_pubkey_hex(node_id: str) -> str:
    return public_key_hex(node_key(node_id))


def signed_observation(
    node_id: str,
    round_id: str,
    tis: float = 0.85,
    *,
    bias_flags: tuple[str, ...] = (),
    audit_id: int = 1,
    window_hours: int = 24,
    timestamp: str = TIMESTAMP,
    outcome_tag: str = "",
) -> Observation:
    """A validly signed observation; `outcome_tag` varies the outcome hash."""
    digest = hashlib.sha256(f"{round_id}|{outcome_tag}".encode()).hexdigest()
    content = ObservationContent(
        node_id=node_id,
        audit_id=audit_id,
        round_id=round_id,
        window_hours=window_hours,
        timestamp=timestamp,
        forecast_hash="sha256:" + hashlib.sha256(round_id.encode()).hexdigest(),
        outcome_hash="sha256:" + digest,
        tis_components=TisComponents(tis, tis, tis),
        tis_overall=tis,
        bias_flags=tuple(sorted(bias_flags)),
    )
    return sign_observation(node_key(node_id), content)


tis_values = st.floats(min_value=0.0, max_value=1.0, allow_nan=False).map(
    lambda value: round(value, 6)
)
"""TIS in [0, 1] with the 6 decimals the signing message keeps."""

bias_flag_sets = st.frozensets(st.sampled_from(BIAS_FLAGS)).map(lambda flags: tuple(sorted(flags)))

round_ids = st.integers(min_value=1, max_value=999).map(lambda n: f"round_{n:03d}")


@st.composite
def observations(
    draw: st.DrawFn,
    node_ids: Sequence[str] = NODE_IDS,
    rounds: st.SearchStrategy[str] = round_ids,
) -> Observation:
    """One signed observation from one of `node_ids` for a generated round."""
    return signed_observation(
        draw(st.sampled_from(node_ids)),
        draw(rounds),
        draw(tis_values),
        bias_flags=draw(bias_flag_sets),
        audit_id=draw(st.integers(min_value=1, max_value=10**6)),
    )
