"""Crafted, validly signed observations for drills and testnet scenarios."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .crypto import sign_observation
from .models import ObservationContent, TisComponents, format_utc


def load_key_file(path: Path) -> Ed25519PrivateKey:
    """A node_id.sec file (64 hex chars); ValueError/OSError when it is not one."""
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(path.read_text().strip()))


def signed_observation(
    key_file: Path,
    node_id: str,
    round_id: str,
    *,
    tis: float,
    audit_id: int,
    window_hours: int = 24,
    bias_flags: tuple[str, ...] = (),
) -> dict[str, Any]:
    seed = f"{round_id}|{tis}".encode()
    content = ObservationContent(
        node_id=node_id,
        audit_id=audit_id,
        round_id=round_id,
        window_hours=window_hours,
        timestamp=format_utc(datetime.now(UTC)),
        forecast_hash="sha256:" + hashlib.sha256(b"sim-forecast|" + seed).hexdigest(),
        outcome_hash="sha256:" + hashlib.sha256(b"sim-outcome|" + seed).hexdigest(),
        tis_components=TisComponents(tis, tis, tis),
        tis_overall=tis,
        bias_flags=bias_flags,
    )
    return sign_observation(load_key_file(key_file), content).to_dict()
