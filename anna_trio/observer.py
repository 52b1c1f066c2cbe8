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

from .models import (
    COMPONENT_NAMES,
    FileObserver,
    ObservationContent,
    ObserverConfig,
    SyntheticObserver,
    TisComponents,
)

log = logging.getLogger("anna.observer")
_CONTENT = attrs.fields(ObservationContent)


@attrs.frozen
class Measurement:
    """What an observer decides of an observation; checked by the same validators, so
    what a node signs is always an observation its peers accept."""

    tis_components: TisComponents
    tis_overall: float = attrs.field(validator=_CONTENT.tis_overall.validator)
    bias_flags: tuple[str, ...] = attrs.field(validator=_CONTENT.bias_flags.validator)
    forecast_hash: str = attrs.field(validator=_CONTENT.forecast_hash.validator)
    outcome_hash: str = attrs.field(validator=_CONTENT.outcome_hash.validator)


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
        if isinstance(self._config, FileObserver):
            return await trio.to_thread.run_sync(_read_measurement_file, self._config.path)
        return self._synthetic(self._config, round_id, window_hours)

    def _synthetic(
        self, config: SyntheticObserver, round_id: str, window_hours: int
    ) -> Measurement:
        def around(center: float) -> float:
            value = center + self._random.uniform(-config.jitter, config.jitter)
            return round(min(1.0, max(0.0, value)), 6)

        components = TisComponents(around(config.tis), around(config.tis), around(config.tis))
        seed = f"{round_id}|{window_hours}".encode()
        return Measurement(
            tis_components=components,
            tis_overall=around(config.tis),
            bias_flags=(),
            forecast_hash="sha256:" + hashlib.sha256(b"forecast|" + seed).hexdigest(),
            outcome_hash="sha256:" + hashlib.sha256(b"outcome|" + seed).hexdigest(),
        )


def _read_measurement_file(path: Path) -> Measurement | None:
    """Parse the mirror audit's latest.json; any problem means no contribution (logged)."""
    try:
        data: Any = json.loads(path.read_text())
        components = data["tis_components"]
        return Measurement(
            tis_components=TisComponents(
                **{name: float(components[name]) for name in COMPONENT_NAMES}
            ),
            tis_overall=float(data["tis_overall"]),
            bias_flags=tuple(sorted(set(data.get("bias_flags", [])))),
            forecast_hash=str(data["forecast_hash"]),
            outcome_hash=str(data["outcome_hash"]),
        )
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError) as exc:
        log.warning("observer file %s unusable, not contributing to this round: %s", path, exc)
        return None
