"""annactl keys init / show: the node's Ed25519 key pair (SPEC §2, §3)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def register(commands: Any) -> None:
    keys = commands.add_parser("keys", help="the node's Ed25519 key pair")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    default_dir = str(Path(os.environ.get("ANNA_STATE_DIR", "/var/lib/anna")) / "keys")
    for name, handler, text in (
        ("init", _init, "create the key pair"),
        ("show", _show, "print the public key"),
    ):
        parser = actions.add_parser(name, help=text)
        parser.add_argument("--keys-dir", default=default_dir)
        parser.set_defaults(handler=handler)


def _init(args: argparse.Namespace) -> int:
    from ..crypto import SECRET_KEY_FILE, create_keypair, public_key_hex

    keys_dir = Path(args.keys_dir)
    if (keys_dir / SECRET_KEY_FILE).exists():
        print(
            f"annactl: {keys_dir / SECRET_KEY_FILE} exists; refusing to replace a node key",
            file=sys.stderr,
        )
        return 1
    key = create_keypair(keys_dir)
    print(f"created {keys_dir / SECRET_KEY_FILE} (0600); pubkey: {public_key_hex(key)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .._exceptions import ConfigError
    from ..crypto import load_private_key, public_key_hex

    try:
        key = load_private_key(Path(args.keys_dir))
    except ConfigError as exc:
        print(f"annactl: {exc}", file=sys.stderr)
        return exc.exit_code
    print(public_key_hex(key))
    return 0
