"""annactl: the operator CLI. Parsing and printing only; the work lives in the package.

Each `cmd_*` module registers its sub-commands. They import only the standard library
at module level so that `annactl --help` stays fast; handlers import what they need.
Exit codes: 0 ok, 1 the checked thing is bad, 2 usage, 65/78 as for annad.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__

COMMAND_MODULES = ("cmd_node", "cmd_keys", "cmd_state", "cmd_certs", "cmd_config", "cmd_testnet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="annactl", description="Operate anna-trio nodes, state, keys, certificates, testnets."
    )
    parser.add_argument("--version", action="version", version=f"annactl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = 0
    except OSError as exc:  # a path no handler expected: said plainly, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"annactl {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
