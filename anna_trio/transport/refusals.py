"""Refused input, logged without letting a flood of it flood the journal.

A hostile client can send thousands of malformed requests or broken handshakes a
second; each is counted in a metric, and the log gets the first of each kind at once,
then at most one line per kind every `every` seconds, saying how many more it stands
for. Time is passed in, so the rule is pure.
"""

from __future__ import annotations

import logging
import math

REFUSAL_LOG_EVERY = 10.0


class RefusalLog:
    def __init__(self, logger: logging.Logger, every: float = REFUSAL_LOG_EVERY) -> None:
        self._logger = logger
        self._every = every
        self._next_line: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def note(self, kind: str, message: str, now: float) -> None:
        """Log `message` unless a line of this `kind` went out less than `every` s ago;
        then it is only counted, and the next line says how many it held back."""
        if now < self._next_line.get(kind, -math.inf):
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        held = self._held.pop(kind, 0)
        more = f" (and {held} more like it since the last such line)" if held else ""
        self._logger.warning("%s%s", message, more)
        self._next_line[kind] = now + self._every
