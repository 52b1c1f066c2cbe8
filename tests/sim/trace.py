"""The run's trace: every message and its answer, every fault and nemesis event, every
log line the nodes write, stamped with the mock clock. Two runs of one seed must
produce it byte for byte; a failing seed's trace can be written out to read."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from .process import current_node


class Trace:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, kind: str, text: str) -> None:
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio.run: set-up and the final checks
            now = -1.0
        self.lines.append(f"{now!r} {kind} {text}")

    def digest(self) -> str:
        hasher = hashlib.sha256()
        for line in self.lines:
            hasher.update(line.encode("utf-8", "backslashreplace") + b"\n")
        return hasher.hexdigest()

    def write(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n", encoding="utf-8", errors="backslashreplace")

    @contextmanager
    def capturing_logs(self) -> Iterator[None]:
        """The `anna` loggers at INFO into the trace (labelled with the node whose task
        logged), and not to the test's log capture: thousands of seeds would fill it."""
        logger = logging.getLogger("anna")
        handler = _TraceHandler(self)
        saved = logger.level, logger.propagate
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]


class _TraceHandler(logging.Handler):
    def __init__(self, trace: Trace) -> None:
        super().__init__()
        self._trace = trace

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" [{type(record.exc_info[1]).__name__}: {record.exc_info[1]}]"
        self._trace.add("log", f"{current_node.get()} {record.levelname} {record.name}: {text}")
