"""annactl testnet init/up/down/run/scenarios: the local 3-node testnet (SPEC §10)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import attrs


def register(commands: Any) -> None:
    testnet = commands.add_parser("testnet", help="the local 3-node testnet")
    actions = testnet.add_subparsers(dest="testnet_command", metavar="ACTION", required=True)
    default_dir = os.environ.get("ANNA_TESTNET_DIR", "artifacts/testnet")
    for name, handler, text in (
        ("init", _init, "create keys, a CA, certificates and peers files for 3 nodes"),
        ("up", _up, "start the 3 nodes and wait until they are ready (init first if needed)"),
        ("down", _down, "stop the 3 nodes"),
        ("run", _run, "init, up, run the three scenarios, collect artifacts, down"),
        ("scenarios", _scenarios, "run the three scenarios against a running testnet"),
    ):
        parser = actions.add_parser(name, help=text)
        parser.add_argument(
            "--dir", default=default_dir, help="testnet folder (default %(default)s)"
        )
        if name == "init":
            parser.add_argument(
                "--compose", action="store_true", help="peer addresses anna-node-N (containers)"
            )
            parser.add_argument("--force", action="store_true", help="recreate a non-empty folder")
        if name in ("up", "run", "scenarios"):
            parser.add_argument(
                "--json", action="store_true", help="the endpoints and results as JSON lines"
            )
        parser.set_defaults(handler=handler)


def _init(args: argparse.Namespace) -> int:
    from ..testnet import Layout, init

    try:
        init(Layout(Path(args.dir)), compose=args.compose, force=args.force)
    except FileExistsError as exc:
        print(f"annactl: {exc}", file=sys.stderr)
        return 1
    print(f"testnet initialised in {args.dir}")
    return 0


def _up(args: argparse.Namespace) -> int:
    """Start the testnet in DIR, making one first if there is none (as `compose up`)."""
    from ..testnet import Layout, down, init, up

    layout = Layout.load(Path(args.dir))
    if not (layout.node_dir(1) / "peers.yml").exists():
        init(layout)
        print(f"no testnet in {args.dir}: initialised one")
    try:
        up(layout)
    except (FileNotFoundError, RuntimeError) as exc:
        down(layout)
        print(f"annactl: {exc}", file=sys.stderr)
        return 1
    _print_endpoints(layout, args.json)
    return 0


def _print_endpoints(layout: Any, as_json: bool) -> None:
    """Each node's RPC and metrics addresses, and its console's URL."""
    scheme = "https" if layout.tls else "http"
    for ep in layout.endpoints:
        metrics = f"http://{ep.host}:{ep.metrics_port}"
        rpc = f"{scheme}://{ep.host}:{ep.rpc_port}"
        if as_json:
            node = {"node_id": ep.node_id, "rpc": rpc, "metrics": metrics, "console": metrics + "/"}
            print(json.dumps(node))
        else:
            print(f"{ep.node_id}: rpc {rpc} metrics {metrics} console {metrics}/")


def _down(args: argparse.Namespace) -> int:
    from ..testnet import Layout, down

    for line in down(Layout.load(Path(args.dir))):
        print(line)
    return 0


def _scenarios(args: argparse.Namespace) -> int:
    import trio

    from ..testnet import Layout, run_scenarios, summary_table

    try:
        results = trio.run(run_scenarios, Layout.load(Path(args.dir)))
    except RuntimeError as exc:
        print(f"annactl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for result in results:
            print(json.dumps(attrs.asdict(result), sort_keys=True))
    else:
        print(summary_table(results))
        print(f"artifacts in {args.dir}")
    return 0 if all(r.passed for r in results) else 1


def _run(args: argparse.Namespace) -> int:
    from ..testnet import Layout, down, init, up

    layout = Layout(Path(args.dir))
    if (layout.node_dir(1) / "annad.pid").exists():
        down(Layout.load(layout.directory))
    init(layout, force=True)
    print(f"testnet initialised in {layout.directory}; starting 3 nodes (mTLS)")
    try:
        up(layout)
        _print_endpoints(layout, args.json)
        return _scenarios(args)
    except RuntimeError as exc:
        print(f"annactl: {exc}", file=sys.stderr)
        return 1
    finally:
        for line in down(layout):
            print(line)
