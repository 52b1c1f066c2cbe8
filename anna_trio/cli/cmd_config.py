"""annactl config check: validate a peers file exactly as a SIGHUP reload would (SPEC §6)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_CONFIG = 78
DEFAULT_PEERS_FILE = "/etc/anna/peers.yml"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = commands.add_parser("config", help="check configuration files")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="validate a peers file as a reload would",
        description="Validate a peers file as annad does at start-up and on reload: YAML, "
        "types and ranges, unique ids and addresses, public keys, TLS files. Lists every "
        "problem with its line number. Exit 0 when valid, 78 otherwise.",
    )
    check.add_argument(
        "--peers",
        metavar="FILE",
        help=f"peers file (default: $ANNA_PEERS, else {DEFAULT_PEERS_FILE})",
    )
    check.add_argument(
        "--node-id",
        metavar="ID",
        help="also require this node in the peer list (default: $ANNA_NODE_ID or $NODE_ID "
        "when set)",
    )
    check.add_argument("--json", action="store_true", help="the result as one JSON object")
    check.set_defaults(handler=check_handler)


def check_handler(args: argparse.Namespace) -> int:
    """Print `OK: ...` and return 0, or print every problem and return 78."""
    from .._exceptions import ConfigError
    from ..config import load_cluster_config

    peers_file = Path(args.peers or os.environ.get("ANNA_PEERS") or DEFAULT_PEERS_FILE)
    node_id = args.node_id or os.environ.get("ANNA_NODE_ID") or os.environ.get("NODE_ID") or None
    try:
        cluster = load_cluster_config(peers_file, node_id=node_id)
    except ConfigError as exc:
        if args.json:
            print(json.dumps({"ok": False, "problems": exc.problems}))
            return EXIT_CONFIG
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"FAILED: {count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        summary = {
            "peers": len(cluster.peers),
            "quorum": cluster.quorum,
            "tls": cluster.tls.enabled,
        }
        print(json.dumps({"ok": True, "problems": [], **summary}))
        return 0
    tls = "on" if cluster.tls.enabled else "off"
    print(
        f"OK: {len(cluster.peers)} peers, quorum {cluster.quorum} ({cluster.quorum_rule}), "
        f"TLS {tls}"
    )
    return 0
