"""What this node measures each round: synthetic (testnets) or the mirror-audit's file."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .models import (
    FileObserver,
    ObservationContent,
    ObserverConfig,
    SyntheticObserver,
    TisComponents,
    structure_message,
)

if TYPE_CHECKING:  # seams names Measurement, defined here
    from .seams import RandomSource

log = logging.getLogger("anna.observer")
_CONTENT = attrs.fields(ObservationContent)


def _flag_set(value: Any) -> Any:
    """Bias flags as a set: each once, sorted (the mirror audit may repeat one)."""
    return tuple(sorted(set(value))) if isinstance(value, list | tuple) else value


@attrs.frozen
class Measurement:
    """What an observer decides of an observation; checked by the same validators, so
    what a node signs is always an observation its peers accept.

    Also the mirror audit's latest.json (SPEC §1), structured by the strict converter:
    these keys and no others, no coercion (`"0.5"` and `true` are no numbers), finite
    numbers; `bias_flags` may be left out."""

    tis_components: TisComponents
    tis_overall: float = attrs.field(validator=_CONTENT.tis_overall.validator)
    forecast_hash: str = attrs.field(validator=_CONTENT.forecast_hash.validator)
    outcome_hash: str = attrs.field(validator=_CONTENT.outcome_hash.validator)
    bias_flags: tuple[str, ...] = attrs.field(
        default=(), converter=_flag_set, validator=_CONTENT.bias_flags.validator
    )


class ConfiguredObserver:
    """The observer annad.yml configures: a Measurement for a round, or None when this
    node cannot contribute to it."""

    def __init__(
        self, config: ObserverConfig, node_id: str, rng: RandomSource | None = None
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
    """The mirror audit's latest.json as a Measurement. A file that cannot be read or
    is no valid measurement means no contribution: logged (every problem, by field),
    never raised."""
    try:
        data: Any = json.loads(path.read_text())
        return structure_message(data, Measurement, "top level")
    except (OSError, ValueError) as exc:  # unreadable, no JSON, or no measurement
        log.warning("observer file %s unusable, not contributing to this round: %s", path, exc)
        return None
