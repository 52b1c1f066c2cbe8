"""annad processes (three unless asked for more), each in its own network namespace, mTLS on.

The layout is a normal testnet layout whose hosts are the namespace addresses: every
node listens on 8001 (RPC) and 9090 (metrics) of its own address, and its certificate
names that address. Processes start like testnet.start_node (own session, failpoints
over HTTP, log appended to nodeN/annad.log), prefixed with `ip netns exec`, which
execs: the Popen pid is annad's pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from netns import ChaosNetwork

from anna_trio import testnet

ROUND_TIMEOUT = 1.0
STOP_TIMEOUT = 10.0


class ChaosCluster:
    """The annad processes of one scenario, by node number."""

    def __init__(self, network: ChaosNetwork, directory: Path, count: int = 3) -> None:
        assert count <= network.nodes, f"{count} nodes need {count} namespaces"
        self.network = network
        self.layout = testnet.Layout(
            directory,
            rpc_ports=(8001,) * count,
            metrics_ports=(9090,) * count,
            hosts=tuple(network.address(n) for n in range(1, count + 1)),
            tls=True,
            round_timeout=ROUND_TIMEOUT,
        )
        testnet.init(self.layout)
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def numbers(self) -> list[int]:
        return [ep.n for ep in self.layout.endpoints]

    def node_dir(self, n: int) -> Path:
        return self.layout.node_dir(n)

    def start(self, n: int, env: dict[str, str] | None = None) -> None:
        assert n not in self.processes, f"node {n} is already running"
        ep = self.layout.endpoints[n - 1]
        command = self.network.exec_prefix(n) + testnet.annad_command(self.layout, ep)
        full_env = dict(os.environ, ANNA_FAILPOINTS_HTTP="1", **(env or {}))
        with (self.node_dir(n) / "annad.log").open("ab") as log:
            self.processes[n] = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                start_new_session=True,
            )

    def start_all(self) -> None:
        for n in self.numbers:
            self.start(n)

    async def wait_ready(self, *nodes: int) -> None:
        await testnet.wait_ready(self.layout, list(nodes or self.processes))

    def pid(self, n: int) -> int:
        return self.processes[n].pid

    def kill(self, n: int) -> int:
        """SIGKILL, as in a crash; returns the exit status."""
        process = self.processes.pop(n)
        process.kill()
        return process.wait()

    def sighup(self, n: int) -> None:
        os.kill(self.pid(n), signal.SIGHUP)

    def rss_bytes(self, n: int) -> int:
        """VmRSS of node n's annad."""
        for line in Path(f"/proc/{self.pid(n)}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"node {n}: no VmRSS in /proc/{self.pid(n)}/status")

    def stop_all(self) -> dict[int, int]:
        """SIGTERM everything, SIGKILL what outlives STOP_TIMEOUT; returns exit statuses."""
        codes = testnet.stop_processes(self.processes, STOP_TIMEOUT)
        self.processes.clear()
        return codes

    def log_tail(self, n: int, lines: int = 20) -> str:
        try:
            text = (self.node_dir(n) / "annad.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
