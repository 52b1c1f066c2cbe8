"""annad: the daemon's entry point. Parses the command line and settings, sets up
logging, maps errors to exits."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from .._exceptions import AnnaError, ConfigError
from ..addresses import parse_host_port
from ..config.settings import (
    DEFAULT_AUDIT_LOG,
    DEFAULT_CONFIG_FILE,
    DEFAULT_PEERS_FILE,
    DEFAULT_PID_FILE,
    DEFAULT_STATE_DIR,
    LOG_FORMATS,
    LOG_LEVELS,
)


class _AnnadArgumentParser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE), as SPEC §1 says, not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(64, f"{self.prog}: error: {message}\n")


def _duration_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seconds, e.g. 10 or 0.5; got {text!r}"
        ) from None


def _host_port_arg(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_annad_parser() -> argparse.ArgumentParser:
    """annad's command line (SPEC §1); every setting defaults to None so layers apply."""
    parser = _AnnadArgumentParser(
        prog="annad",
        description="The anna-trio audit-consensus node. Flags override ANNA_* environment "
        "variables, which override the --config YAML file, which overrides defaults.",
    )
    parser.add_argument("--version", action="version", version=f"annad {__version__}")
    add = parser.add_argument
    add(
        "--config",
        metavar="FILE",
        help=f"settings YAML (default {DEFAULT_CONFIG_FILE} if it exists)",
    )
    add("--node-id", metavar="ID", help="this node's id (env ANNA_NODE_ID, then NODE_ID); required")
    add("--state-dir", metavar="DIR", help=f"state directory (default {DEFAULT_STATE_DIR})")
    add("--peers", metavar="FILE", help=f"cluster config (default {DEFAULT_PEERS_FILE})")
    add("--audit-log", metavar="FILE", help=f"audit log (default {DEFAULT_AUDIT_LOG})")
    add(
        "--rpc-listen",
        metavar="HOST:PORT",
        type=_host_port_arg,
        help="RPC address (default 0.0.0.0:<this node's port in peers.yml>; env RPC_PORT sets the port)",
    )
    add(
        "--metrics-listen",
        metavar="HOST:PORT",
        type=_host_port_arg,
        help="metrics address (default 0.0.0.0:9090)",
    )
    add("--pid-file", metavar="FILE", help=f"pid file (default {DEFAULT_PID_FILE})")
    add(
        "--round-interval",
        metavar="SECONDS",
        type=_duration_arg,
        help="start a round every SECONDS; 0 (default) starts rounds only when asked",
    )
    add(
        "--round-timeout",
        metavar="SECONDS",
        type=_duration_arg,
        help="round deadline in seconds (default 10; fractions allowed)",
    )
    add("--log-level", choices=LOG_LEVELS, help="default info")
    add("--log-format", choices=LOG_FORMATS, help="default text")
    add(
        "--console",
        action=argparse.BooleanOptionalAction,
        help="serve the read-only web console at / on the metrics listener (default on)",
    )
    return parser


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
    from ..config import load_settings

    args = build_annad_parser().parse_args(argv)
    try:
        settings = load_settings(vars(args), os.environ)
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
