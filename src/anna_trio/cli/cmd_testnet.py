"""annactl testnet init/up/down/run/scenarios: the local 3-node testnet (SPEC §10)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def register(commands: Any) -> None:
    testnet = commands.add_parser("testnet", help="the local 3-node testnet")
    actions = testnet.add_subparsers(dest="testnet_command", metavar="ACTION", required=True)
    default_dir = os.environ.get("ANNA_TESTNET_DIR", "artifacts/testnet")
    for name, handler, text in (
        ("init", _init, "create keys, a CA, certificates and peers files for 3 nodes"),
        ("up", _up, "start the 3 nodes and wait until they are ready"),
        ("down", _down, "stop the 3 nodes"),
        ("run", _run, "init, up, run the three scenarios, collect artifacts, down"),
        ("scenarios", _scenarios, "run the three scenarios against a running testnet"),
    ):
        parser = actions.add_parser(name, help=text)
        parser.add_argument("--dir", default=default_dir, help="testnet folder (default %(default)s)")
        if name == "init":
            parser.add_argument("--compose", action="store_true", help="peer addresses anna-node-N (containers)")
            parser.add_argument("--force", action="store_true", help="recreate a non-empty folder")
        parser.set_defaults(handler=handler)


def _init(args: argparse.Namespace) -> int:
    from ..testnet import init

    try:
        init(Path(args.dir), compose=args.compose, force=args.force)
    except FileExistsError as exc:
        print(f"annactl: {exc}", file=sys.stderr)
        return 1
    print(f"testnet initialised in {args.dir}")
    return 0


def _up(args: argparse.Namespace) -> int:
    from ..testnet import down, endpoints, up

    try:
        up(Path(args.dir))
    except (FileNotFoundError, RuntimeError) as exc:
        down(Path(args.dir))
        print(f"annactl: {exc}", file=sys.stderr)
        return 1
    for ep in endpoints():
        print(f"{ep.node_id}: rpc https://127.0.0.1:{ep.rpc_port} metrics http://127.0.0.1:{ep.metrics_port}")
    return 0


def _down(args: argparse.Namespace) -> int:
    from ..testnet import down

    for line in down(Path(args.dir)):
        print(line)
    return 0


def _scenarios(args: argparse.Namespace) -> int:
    import trio

    from ..testnet import run_scenarios, summary_table

    results = trio.run(run_scenarios, Path(args.dir))
    print(summary_table(results))
    print(f"artifacts in {args.dir}")
    return 0 if all(r.passed for r in results) else 1


def _run(args: argparse.Namespace) -> int:
    from ..testnet import down, init, up

    directory = Path(args.dir)
    if (directory / "node1" / "annad.pid").exists():
        down(directory)
    init(directory, force=True)
    print(f"testnet initialised in {directory}; starting 3 nodes (mTLS)")
    try:
        up(directory)
        return _scenarios(args)
    except RuntimeError as exc:
        print(f"annactl: {exc}", file=sys.stderr)
        return 1
    finally:
        for line in down(directory):
            print(line)
