"""The container engine of the compose suite: dockerd started for it, stopped after, and the
host's network put back as it was found.

dockerd changes the host: the iptables FORWARD policy becomes DROP (with bridge netfilter
on, that also cuts the chaos suite's namespaces off each other), DOCKER chains appear in
the filter and nat tables, docker0 and br-*/veth* links come and go, and
net.ipv4.ip_forward is set. `HostNetwork.snapshot()` records those before; `restore()`
removes every rule, chain and docker link that was not there and resets policies and the
sysctl — whatever the engine left, also after a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

TABLES = ("filter", "nat")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
DOCKER_LINK = re.compile(r"^(docker0|br-[0-9a-f]{12}|veth[0-9a-f]{7})$")
# tests/chaos/netns.py's lock: a chaos run on this machine waits while the firewall is docker's.
CHAOS_LOCK = Path("/tmp/annach.lock")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class EngineError(Exception):
    """dockerd did not start, or did not stop."""


def _run(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise EngineError(f"`{shlex.join(argv)}` exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _chains_and_rules(table: str) -> tuple[dict[str, str], list[str]]:
    """({chain: policy or "-"}, ["-A CHAIN ..." rules]) of one table, as `iptables -S` says."""
    chains: dict[str, str] = {}
    rules: list[str] = []
    for line in _run("iptables", "-t", table, "-S").splitlines():
        words = line.split()
        if words[:1] == ["-P"]:
            chains[words[1]] = words[2]
        elif words[:1] == ["-N"]:
            chains[words[1]] = "-"
        elif words[:1] == ["-A"]:
            rules.append(line)
    return chains, rules


def _links() -> set[str]:
    names = set()
    for line in _run("ip", "-o", "link", "show").splitlines():
        # "7: br-0123456789ab: <...>" / "9: veth1234567@if8: <...>"
        names.add(line.split(":")[1].strip().split("@")[0])
    return names


@attrs.frozen
class HostNetwork:
    """What of the host's network the engine changes, at one moment."""

    tables: dict[str, tuple[dict[str, str], list[str]]]
    links: frozenset[str]
    ip_forward: str

    @classmethod
    def snapshot(cls) -> HostNetwork:
        return cls(
            {table: _chains_and_rules(table) for table in TABLES},
            frozenset(_links()),
            IP_FORWARD.read_text().strip(),
        )

    def restore(self) -> None:
        """Undo, in the running host, every difference from this snapshot."""
        for table in TABLES:
            chains, rules = self.tables[table]
            now_chains, now_rules = _chains_and_rules(table)
            for rule in now_rules:
                if rule not in rules:
                    _run("iptables", "-t", table, "-D", *shlex.split(rule)[1:], check=False)
            for chain, policy in now_chains.items():
                if policy == "-" and chain not in chains:
                    _run("iptables", "-t", table, "-F", chain, check=False)
                    _run("iptables", "-t", table, "-X", chain, check=False)
                elif policy != "-" and policy != chains.get(chain, "ACCEPT"):
                    _run("iptables", "-t", table, "-P", chain, chains.get(chain, "ACCEPT"))
        for link in _links() - self.links:
            if DOCKER_LINK.match(link):
                _run("ip", "link", "delete", link, check=False)
        IP_FORWARD.write_text(self.ip_forward + "\n")

    def differences(self, later: HostNetwork) -> list[str]:
        """What `later` has that this snapshot had not, or lacks (empty: the same)."""
        found = []
        for table in TABLES:
            chains, rules = self.tables[table]
            later_chains, later_rules = later.tables[table]
            for chain in sorted(set(chains) | set(later_chains)):
                before, after = chains.get(chain), later_chains.get(chain)
                if "-" in (before, after):  # a user-defined chain
                    if (before is None) != (after is None):
                        found.append(
                            f"{table}: {'new' if before is None else 'lost'} chain {chain}"
                        )
                elif (before or "ACCEPT") != (after or "ACCEPT"):  # unloaded table: ACCEPT
                    found.append(
                        f"{table} {chain} policy {before or 'ACCEPT'} -> {after or 'ACCEPT'}"
                    )
            found += [f"{table}: new rule {rule}" for rule in later_rules if rule not in rules]
            found += [f"{table}: lost rule {rule}" for rule in rules if rule not in later_rules]
        found += [f"new link {link}" for link in sorted(later.links - self.links)]
        found += [f"lost link {link}" for link in sorted(self.links - later.links)]
        if self.ip_forward != later.ip_forward:
            found.append(f"net.ipv4.ip_forward {self.ip_forward} -> {later.ip_forward}")
        return found


def engine_running() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@contextlib.contextmanager
def docker_engine(log: Path) -> Iterator[None]:
    """A running dockerd for the duration: one already running is used and left alone;
    otherwise one is started, stopped by its pid after, and the host network restored
    (EngineError if it could not be)."""
    with CHAOS_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if engine_running():
            yield
            return
        found = HostNetwork.snapshot()
        with log.open("ab") as output:
            dockerd = subprocess.Popen(
                ["dockerd", "--storage-driver=overlay2"],
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not engine_running():
                if dockerd.poll() is not None or time.monotonic() > deadline:
                    raise EngineError(f"dockerd did not start (see {log})")
                time.sleep(0.2)
            yield
        finally:
            dockerd.send_signal(signal.SIGTERM)
            try:
                dockerd.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(dockerd.pid, signal.SIGKILL)  # dockerd and the containerd it started
                dockerd.wait()
            found.restore()
            left = found.differences(HostNetwork.snapshot())
            if left:
                raise EngineError(f"the host network is not as found: {left}")
