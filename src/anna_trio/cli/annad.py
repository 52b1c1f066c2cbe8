"""annad: the daemon's entry point. Parses settings, sets up logging, maps errors to exits."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence

from .._exceptions import AnnaError


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for journald/ELK (`--log-format json`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("anna.http",):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def main(argv: Sequence[str] | None = None) -> None:
    from ..config import build_annad_parser, resolve_settings

    args = build_annad_parser().parse_args(argv)
    try:
        settings = resolve_settings(args, os.environ)
    except AnnaError as exc:
        print(f"annad: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    setup_logging(settings.log_level, settings.log_format)
    from ..daemon import run_daemon

    try:
        run_daemon(settings)
    except KeyboardInterrupt:
        sys.exit(0)
    except Exception as exc:
        error = _deliberate(exc)
        if error is None:  # the root nursery failed: exit 1 and let systemd restart us
            logging.getLogger("anna.daemon").critical("unexpected internal error", exc_info=exc)
            print(f"annad: unexpected internal error: {exc!r}", file=sys.stderr)
            sys.exit(1)
        logging.getLogger("anna.daemon").error("exiting: %s", error)
        print(f"annad: {_one_line(error)}", file=sys.stderr)
        sys.exit(error.exit_code)
    sys.exit(0)


def _deliberate(exc: BaseException) -> AnnaError | None:
    """The AnnaError behind `exc`, also when a nursery wrapped it alone in a group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, AnnaError) else None


def _one_line(exc: BaseException) -> str:
    problems = getattr(exc, "problems", None)
    if problems and len(problems) > 1:
        return f"{exc}: " + "; ".join(problems)
    return str(exc)


if __name__ == "__main__":
    main()
