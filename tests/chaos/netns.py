"""Network namespaces for the chaos suite: one per node, joined by a bridge of our own.

    root namespace:  bridge annachbr = 10.203.0.254/24 (the test runner's control path)
                     annachv1 .. annachvN enslaved to the bridge
    annachN:         eth0 = 10.203.0.N/24 (the veth peer of annachvN), lo up

Traffic stays inside these namespaces and the bridge. A partition is a pair of
blackhole routes per cut (one in each namespace): node↔node packets go nowhere while
the runner, on .254, still reaches every node. No iptables and no netem needed.
Everything is torn down after, and stale leftovers of a crashed run are removed first.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = "annach"
BRIDGE = f"{PREFIX}br"
SUBNET = "10.203.0"
RUNNER_ADDRESS = f"{SUBNET}.254"
LOCK_FILE = Path("/tmp/annach.lock")
IP_TIMEOUT = 10.0


class NetnsUnavailable(Exception):
    """Network namespaces, veths or bridges cannot be made here (not root, no iproute2…)."""


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> str:
    command = ["ip", *args] if namespace is None else ["ip", "-n", namespace, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=IP_TIMEOUT, check=False)
    if check and done.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    return done.stdout


def cleanup_stale() -> None:
    """Remove every namespace and link of ours, e.g. left by a run that was killed."""
    for line in _ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            _ip("netns", "delete", name, check=False)
    for line in _ip("-o", "link", "show", check=False).splitlines():
        # "7: annachv1@if6: <...>" -> annachv1
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(PREFIX):
            _ip("link", "delete", name, check=False)


@contextmanager
def exclusive() -> Iterator[None]:
    """One chaos run per machine at a time: the names and the subnet are fixed."""
    with LOCK_FILE.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ChaosNetwork:
    """N namespaces on one bridge; cut and heal node↔node links with blackhole routes."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes
        self._cuts: set[tuple[int, int]] = set()

    @staticmethod
    def namespace(n: int) -> str:
        return f"{PREFIX}{n}"

    @staticmethod
    def address(n: int) -> str:
        return f"{SUBNET}.{n}"

    def exec_prefix(self, n: int) -> list[str]:
        """Prefix a command with this to run it inside node n's namespace."""
        return ["ip", "netns", "exec", self.namespace(n)]

    def create(self) -> None:
        """Build everything, or raise NetnsUnavailable saying why (cleaning up first)."""
        if os.geteuid() != 0:
            raise NetnsUnavailable("not running as root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("`ip` (iproute2) is not installed")
        cleanup_stale()
        try:
            _ip("link", "add", BRIDGE, "type", "bridge")
            _ip("addr", "add", f"{RUNNER_ADDRESS}/24", "dev", BRIDGE)
            _ip("link", "set", BRIDGE, "up")
            for n in range(1, self.nodes + 1):
                ns, outside = self.namespace(n), f"{PREFIX}v{n}"
                _ip("netns", "add", ns)
                _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", outside, "master", BRIDGE, "up")
                _ip("link", "set", "lo", "up", namespace=ns)
                _ip("addr", "add", f"{self.address(n)}/24", "dev", "eth0", namespace=ns)
                _ip("link", "set", "eth0", "up", namespace=ns)
            for n in range(1, self.nodes + 1):
                self._check_reachable(n)
        except BaseException:
            self.destroy()
            raise

    def _check_reachable(self, n: int) -> None:
        """Nothing listens yet, so a refused connection proves the path works."""
        with socket.socket() as probe:
            probe.settimeout(3.0)
            try:
                probe.connect((self.address(n), 1))
            except ConnectionRefusedError:
                return
            except OSError as exc:
                raise NetnsUnavailable(
                    f"namespace {self.namespace(n)} not reachable from the runner: {exc}"
                ) from exc

    def cut(self, a: int, b: int) -> None:
        """Stop all traffic between nodes a and b (both directions)."""
        for here, there in ((a, b), (b, a)):
            _ip(
                "route", "add", "blackhole", f"{self.address(there)}/32",
                namespace=self.namespace(here),
            )  # fmt: skip
        self._cuts.add((min(a, b), max(a, b)))

    def isolate(self, n: int) -> None:
        """Partition node n away from every other node; the runner still reaches it."""
        for other in range(1, self.nodes + 1):
            if other != n and (min(n, other), max(n, other)) not in self._cuts:
                self.cut(n, other)

    def heal(self) -> None:
        """Remove every cut."""
        for a, b in sorted(self._cuts):
            for here, there in ((a, b), (b, a)):
                _ip(
                    "route", "del", "blackhole", f"{self.address(there)}/32",
                    namespace=self.namespace(here), check=False,
                )  # fmt: skip
        self._cuts.clear()

    def destroy(self) -> None:
        """Delete the namespaces (their veths go with them) and the bridge."""
        self._cuts.clear()
        cleanup_stale()
