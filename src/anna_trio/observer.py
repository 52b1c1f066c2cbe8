"""What this node measures each round: synthetic (testnets) or the mirror-audit's file."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import attrs
import trio

from .models import BIAS_FLAG_RE, HASH_RE, ObserverConfig, TisComponents

log = logging.getLogger("anna.observer")


@attrs.frozen
class Measurement:
    tis_components: TisComponents
    tis_overall: float
    bias_flags: tuple[str, ...]
    forecast_hash: str
    outcome_hash: str


class ConfiguredObserver:
    """The observer annad.yml configures: a Measurement for a round, or None when this
    node cannot contribute to it."""

    def __init__(
        self, config: ObserverConfig, node_id: str, rng: random.Random | None = None
    ) -> None:
        self._config = config
        self._node_id = node_id
        self._random = rng or random.Random()

    async def measure(self, round_id: str, window_hours: int) -> Measurement | None:
        if self._config.kind == "file":
            assert self._config.path is not None
            return await trio.to_thread.run_sync(_read_measurement_file, self._config.path)
        return self._synthetic(round_id, window_hours)

    def _synthetic(self, round_id: str, window_hours: int) -> Measurement:
        def around(center: float) -> float:
            value = center + self._random.uniform(-self._config.jitter, self._config.jitter)
            return round(min(1.0, max(0.0, value)), 6)

        components = TisComponents(
            around(self._config.tis), around(self._config.tis), around(self._config.tis)
        )
        seed = f"{round_id}|{window_hours}".encode()
        return Measurement(
            tis_components=components,
            tis_overall=around(self._config.tis),
            bias_flags=(),
            forecast_hash="sha256:" + hashlib.sha256(b"forecast|" + seed).hexdigest(),
            outcome_hash="sha256:" + hashlib.sha256(b"outcome|" + seed).hexdigest(),
        )


def _read_measurement_file(path: Path) -> Measurement | None:
    """Parse the mirror audit's latest.json; any problem means no contribution (logged)."""
    try:
        data: Any = json.loads(path.read_text())
        components = data["tis_components"]
        values = [
            float(components[k])
            for k in ("prediction_accuracy", "ethical_alignment", "coherence_stability")
        ]
        overall = float(data["tis_overall"])
        flags = tuple(sorted(set(data.get("bias_flags", []))))
        forecast, outcome = str(data["forecast_hash"]), str(data["outcome_hash"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("observer file %s unusable, not contributing to this round: %s", path, exc)
        return None
    if not all(0.0 <= v <= 1.0 for v in [*values, overall]):
        log.warning("observer file %s: TIS values outside [0, 1], not contributing", path)
        return None
    if not (HASH_RE.fullmatch(forecast) and HASH_RE.fullmatch(outcome)) or not all(
        isinstance(f, str) and BIAS_FLAG_RE.fullmatch(f) for f in flags
    ):
        log.warning("observer file %s: bad hashes or bias flags, not contributing", path)
        return None
    return Measurement(TisComponents(*values), overall, flags, forecast, outcome)
