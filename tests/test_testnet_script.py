"""run_rounds.sh against a running testnet, and annad's JSON log format (issue 6)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from anna_trio import testnet

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TESTNET_PORTS = (8001, 8002, 8003, 9001, 9002, 9003)


def _busy_ports() -> list[int]:
    busy = []
    for port in TESTNET_PORTS:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    return busy


def test_run_rounds_script_passes_against_a_running_testnet(tmp_path: Path) -> None:
    """`annactl testnet up` then run_rounds.sh with ANNA_TESTNET_DIR: all three scenarios
    pass, the SPEC §10 artifacts are written, and the script's exit code says so."""
    if busy := _busy_ports():
        pytest.fail(f"testnet ports in use: {busy}")
    directory = tmp_path / "testnet"
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", ANNA_TESTNET_DIR=str(directory))
    annactl = str(BIN / "annactl")
    subprocess.run([annactl, "testnet", "init", "--dir", str(directory)], check=True, env=env)
    up = subprocess.run(
        [annactl, "testnet", "up", "--dir", str(directory)], capture_output=True, text=True, env=env
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        script = subprocess.run(
            [str(ROOT / "testnet" / "scripts" / "run_rounds.sh")],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
        )
    finally:
        subprocess.run([annactl, "testnet", "down", "--dir", str(directory)], env=env, check=False)
    assert script.returncode == 0, script.stdout + script.stderr
    assert "3 passed, 0 failed" in script.stdout
    assert json.loads((directory / "summary.json").read_text())["passed"] is True
    for n in (1, 2, 3):
        assert (directory / f"node_{n}_metrics.txt").read_text().startswith("#")
        for r in (1, 2, 3):
            assert json.loads((directory / f"round_{r}" / f"node_{n}.json").read_text())["node_id"]


def test_run_rounds_script_without_a_testnet_exits_nonzero(tmp_path: Path) -> None:
    """No testnet in ANNA_TESTNET_DIR: a clear message and a non-zero exit, never a pass."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", ANNA_TESTNET_DIR=str(tmp_path))
    script = subprocess.run(
        [str(ROOT / "testnet" / "scripts" / "run_rounds.sh")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert script.returncode != 0
    assert "no testnet" in script.stderr


def test_json_log_format_is_one_object_per_line(tmp_path: Path) -> None:
    """--log-format json: every line annad writes is a JSON object with level and message,
    including the start-up and migration lines an operator greps for."""
    layout = testnet.free_layout(tmp_path / "net", 1, tls=False)
    testnet.init(layout)
    (ep,) = layout.endpoints
    log_path = tmp_path / "annad.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*testnet.annad_command(layout, ep), "--log-format", "json"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        trio.run(testnet.wait_ready, layout)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
    assert code == 0
    lines = log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert entries and all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
    messages = " ".join(e["message"] for e in entries)
    assert "ready" in messages and "WARN: Running with allow_insecure_peers=true" in messages


def test_stop_processes_terms_continues_and_kills() -> None:
    """One helper stops every test and benchmark cluster: a process that exits on SIGTERM
    gets 0 back, a stopped (SIGSTOP) one is continued and exits, one that ignores SIGTERM
    is killed once the timeout is over."""
    program = (
        "import signal, sys, time\n"
        "if sys.argv[1] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "else: signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    processes = {
        n: subprocess.Popen([sys.executable, "-c", program, kind], stdout=subprocess.PIPE)
        for n, kind in ((1, "polite"), (2, "stopped"), (3, "stubborn"))
    }
    for process in processes.values():
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    processes[2].send_signal(signal.SIGSTOP)
    codes = testnet.stop_processes(processes, timeout=1.0)
    assert codes == {1: 0, 2: 0, 3: -signal.SIGKILL}
    for process in processes.values():
        assert process.stdout is not None
        process.stdout.close()
