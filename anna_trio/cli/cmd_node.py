"""annactl status, round start/show, reconcile, reload, sim submit: talking to a running node."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ._http import add_node_arguments, call

RELOAD_WAIT = 10.0


def register(commands: Any) -> None:
    status = commands.add_parser(
        "status", help="this node's rounds, Byzantine list, peers, last reload"
    )
    add_node_arguments(status)
    status.set_defaults(handler=_status)

    round_cmd = commands.add_parser("round", help="start or show consensus rounds")
    rounds = round_cmd.add_subparsers(dest="round_command", metavar="ACTION", required=True)
    start = rounds.add_parser("start", help="start a round cluster-wide; prints its id")
    start.add_argument("--round-id")
    start.add_argument("--window-hours", type=int, default=24)
    add_node_arguments(start)
    start.set_defaults(handler=_round_start)
    show = rounds.add_parser("show", help="one round's result and observations")
    show.add_argument("round_id")
    add_node_arguments(show)
    show.set_defaults(handler=_round_show)

    reconcile = commands.add_parser("reconcile", help="pull missing observations from every peer")
    add_node_arguments(reconcile)
    reconcile.set_defaults(handler=_reconcile)

    reload = commands.add_parser(
        "reload",
        help="SIGHUP the daemon and wait for the reload's result",
        description="Send SIGHUP to the daemon named by --pid-file and wait for the result: "
        "in its audit log, or with --node in its /rpc/status.",
    )
    reload.add_argument(
        "--pid-file", default=os.environ.get("ANNA_PID_FILE", "/run/anna/annad.pid")
    )
    reload.add_argument(
        "--audit-log", default=os.environ.get("ANNA_AUDIT_LOG", "/var/log/anna/audit.jsonl")
    )
    add_node_arguments(reload)
    reload.set_defaults(handler=_reload)

    sim = commands.add_parser("sim", help="crafted observations for drills and testnet scenarios")
    sims = sim.add_subparsers(dest="sim_command", metavar="ACTION", required=True)
    submit = sims.add_parser(
        "submit", help="sign an observation with KEY and POST it to /rpc/submit"
    )
    submit.add_argument("--key", required=True, help="node_id.sec of the signing node")
    submit.add_argument("--node-id", required=True, help="node id the key belongs to")
    submit.add_argument("--round-id", required=True)
    submit.add_argument(
        "--audit-id", type=int, default=None, help="default: current unix time in µs"
    )
    submit.add_argument("--window-hours", type=int, default=24)
    submit.add_argument("--tis", type=float, default=0.85)
    submit.add_argument("--bias-flag", action="append", default=[])
    add_node_arguments(submit)
    submit.set_defaults(handler=_sim_submit)


def _fail(message: str, code: int = 1) -> int:
    print(f"annactl: {message}", file=sys.stderr)
    return code


def _request(
    args: argparse.Namespace, method: str, path: str, body: Any = None
) -> tuple[int, Any] | int:
    try:
        return call(args, method, path, body)
    except ValueError as exc:
        return _fail(str(exc), 2)
    except Exception as exc:  # every transport problem is one clear line for the operator
        from .._exceptions import AnnaError

        if isinstance(exc, AnnaError | OSError):
            return _fail(f"cannot reach node: {exc}")
        raise


def _expect(
    args: argparse.Namespace, method: str, path: str, expected: int, what: str, body: Any = None
) -> dict[str, Any] | int:
    """The node's JSON answer when it has the expected status, else the exit code (printed)."""
    result = _request(args, method, path, body)
    if isinstance(result, int):
        return result
    status, data = result
    if status != expected:
        message = data.get("message", data) if isinstance(data, dict) else data
        return _fail(f"{what}: HTTP {status}: {message}")
    return dict(data)


def _print(args: argparse.Namespace, data: Any) -> None:
    print(json.dumps(data, indent=2 if not args.json else None, sort_keys=True))


def _status(args: argparse.Namespace) -> int:
    data = _expect(args, "GET", "/rpc/status", 200, "status")
    if isinstance(data, int):
        return data
    if args.json:
        _print(args, data)
        return 0
    print(f"node {data['node_id']}: {data['validator_count']} validators, quorum {data['quorum']}")
    print(f"{'ROUND':<40} {'STATUS':<9} {'OBS':>3} {'TIS':>9}")
    for r in data["rounds"][-20:]:
        tis = "-" if r["consensus_tis"] is None else f"{r['consensus_tis']:.6f}"
        print(f"{r['round_id']:<40} {r['status']:<9} {r['total_observations']:>3} {tis:>9}")
    byz = ", ".join(
        f"{b['node_id']} ({b['reason']}, {b['round_id']})" for b in data["byzantine_nodes"]
    )
    print(f"byzantine: {byz or 'none'}")
    for p in data["peers"]:
        print(
            f"peer {p['node_id']:<20} {'up' if p['up'] else 'DOWN':<5} last seen {p['last_seen'] or 'never'}"
        )
    reload = data["last_reload"]
    print(
        f"last reload: {reload['result']} at {reload['at'] or '-'} {reload['error'] or ''}".rstrip()
    )
    return 0


def _round_start(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"window_hours": args.window_hours}
    if args.round_id:
        body["round_id"] = args.round_id
    data = _expect(args, "POST", "/rpc/round/start", 202, "round start refused", body)
    if isinstance(data, int):
        return data
    print(data["round_id"])
    return 0


def _round_show(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    data = _expect(
        args, "GET", "/rpc/status?round_id=" + quote(args.round_id), 200, f"round {args.round_id}"
    )
    if isinstance(data, int):
        return data
    _print(args, data)
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    data = _expect(args, "POST", "/rpc/reconcile", 200, "reconcile", {})
    if isinstance(data, int):
        return data
    print(data["message"])
    return 0


def _reload(args: argparse.Namespace) -> int:
    pid_file, audit_log = Path(args.pid_file), Path(args.audit_log)
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read pid file {pid_file}: {exc}")
    offset = audit_log.stat().st_size if audit_log.exists() else 0
    before = None
    if args.node:
        status = _expect(args, "GET", "/rpc/status", 200, "status")
        if isinstance(status, int):
            return status
        before = status["last_reload"]
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return _fail(f"no process {pid} (stale pid file {pid_file}?)")
    deadline = time.monotonic() + RELOAD_WAIT
    while time.monotonic() < deadline:
        outcome = _reload_outcome(args, before, audit_log, offset)
        if isinstance(outcome, int):
            return outcome
        if outcome is not None:
            if args.json:
                print(json.dumps(outcome, sort_keys=True))
            elif outcome.get("result") == "success":
                print(
                    f"reload succeeded: added {outcome.get('added')}, removed "
                    f"{outcome.get('removed')}, changed {outcome.get('changed')}"
                )
            if outcome.get("result") == "success":
                return 0
            return _fail(f"reload failed: {outcome.get('error')}")
        time.sleep(0.1)
    where = args.node if args.node else str(audit_log)
    return _fail(f"no reload result from {where} after {RELOAD_WAIT:.0f} s")


def _reload_outcome(
    args: argparse.Namespace, before: Any, audit_log: Path, offset: int
) -> dict[str, Any] | int | None:
    """The reload's result once it is known: the node's last_reload once it changed
    (with --node), else the first peer_reload entry the audit log gained."""
    if not args.node:
        return _reload_entry_after(audit_log, offset)
    status = _expect(args, "GET", "/rpc/status", 200, "status")
    if isinstance(status, int):
        return status
    last = status["last_reload"]
    return dict(last) if last != before else None


def _reload_entry_after(audit_log: Path, offset: int) -> dict[str, Any] | None:
    try:
        with audit_log.open("rb") as handle:
            handle.seek(offset)
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == "peer_reload":
            return dict(entry)
    return None


def _sim_submit(args: argparse.Namespace) -> int:
    from ..sim import signed_observation

    try:
        obs = signed_observation(
            Path(args.key),
            args.node_id,
            args.round_id,
            tis=args.tis,
            audit_id=args.audit_id if args.audit_id is not None else time.time_ns() // 1000,
            window_hours=args.window_hours,
            bias_flags=tuple(args.bias_flag),
        )
    except (OSError, ValueError) as exc:
        return _fail(f"cannot sign with --key {args.key}: {exc}", 2)
    result = _request(args, "POST", "/rpc/submit", {"observation": obs})
    if isinstance(result, int):
        return result
    status, data = result
    print(json.dumps({"status": status, "response": data}, sort_keys=True))
    return 0 if status == 200 else 1
