"""Starting, waiting for and stopping the testnet's annad processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import trio

from ..transport.client import HttpClient
from .layout import READY_TIMEOUT, Layout, NodeEndpoint


def annad_command(layout: Layout, ep: NodeEndpoint) -> list[str]:
    node_dir = layout.node_dir(ep.n)
    return [
        sys.executable,
        "-m",
        "anna_trio.cli.annad",
        "--node-id",
        ep.node_id,
        "--state-dir",
        str(node_dir),
        "--peers",
        str(node_dir / "peers.yml"),
        "--audit-log",
        str(node_dir / "audit.jsonl"),
        "--rpc-listen",
        f"{ep.host}:{ep.rpc_port}",
        "--metrics-listen",
        f"{ep.host}:{ep.metrics_port}",
        "--pid-file",
        str(node_dir / "annad.pid"),
        "--round-timeout",
        str(layout.round_timeout),
    ]


def start_node(
    layout: Layout, ep: NodeEndpoint, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start one annad in its own session, logging to nodeN/annad.log."""
    full_env = dict(os.environ, ANNA_FAILPOINTS_HTTP="1", **(env or {}))
    with (layout.node_dir(ep.n) / "annad.log").open("ab") as log:
        return subprocess.Popen(
            annad_command(layout, ep),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
        )


def stop_processes(
    processes: Mapping[int, subprocess.Popen[bytes]], timeout: float = 10.0
) -> dict[int, int]:
    """SIGTERM every process still running (a stopped one is continued first), SIGKILL
    what has not exited `timeout` s later; the exit statuses, by the mapping's keys."""
    for process in processes.values():
        if process.poll() is None:
            for signum in (signal.SIGCONT, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)
    deadline = time.monotonic() + timeout
    codes = {}
    for key, process in sorted(processes.items()):
        try:
            codes[key] = process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            codes[key] = process.wait()
    return codes


def up(layout: Layout) -> list[subprocess.Popen[bytes]]:
    if not (layout.node_dir(1) / "peers.yml").exists():
        raise FileNotFoundError(
            f"{layout.directory} has no testnet (run: annactl testnet init --dir {layout.directory})"
        )
    busy = [
        f"{ep.host}:{port}"
        for ep in layout.endpoints
        for port in (ep.rpc_port, ep.metrics_port)
        if _port_in_use(ep.host, port)
    ]
    if busy:
        raise RuntimeError(
            f"ports already in use: {', '.join(busy)} (another testnet? annactl testnet down --dir …)"
        )
    processes = [start_node(layout, ep) for ep in layout.endpoints]
    trio.run(wait_ready, layout)
    return processes


async def wait_ready(layout: Layout, nodes: list[int] | None = None) -> None:
    chosen = [ep for ep in layout.endpoints if nodes is None or ep.n in nodes]
    with trio.move_on_after(READY_TIMEOUT):
        for ep in chosen:
            while not await _ready(ep):  # noqa: ASYNC110 - remote state: polling is the only way
                await trio.sleep(0.05)
        return
    logs = "; ".join(f"node{ep.n}: " + _tail(layout.node_dir(ep.n) / "annad.log") for ep in chosen)
    raise RuntimeError(f"testnet not ready after {READY_TIMEOUT:.0f} s: {logs}")


def _port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip().splitlines()[-1]
    except (OSError, IndexError):
        return "(no log)"


async def _ready(ep: NodeEndpoint) -> bool:
    client = HttpClient(ep.host, ep.metrics_port)
    try:
        with trio.move_on_after(1):
            return (await client.request("GET", "/ready")).status == 200
        return False
    except OSError:
        return False
    finally:
        await client.aclose()


def down(layout: Layout, *, timeout: float = 10.0) -> list[str]:
    """SIGTERM every node, SIGKILL what is still alive after `timeout`; returns what was done."""
    done = []
    for ep in layout.endpoints:
        pid_file = layout.node_dir(ep.n) / "annad.pid"
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            done.append(f"{ep.node_id}: killed (did not stop in {timeout:.0f} s)")
        else:
            done.append(f"{ep.node_id}: stopped")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# --- scenarios -----------------------------------------------------------------------------
