"""systemd-nspawn machines booting a real systemd as PID 1, for the systemd suites.

    rootfs (cached)   mmdebstrap of Debian with systemd, python3 and the runbooks' tools,
                      in $ANNA_DEPLOY_CACHE/rootfs-<key>, key = hash of what it is made of
    a machine         an overlay on that rootfs (its writes in /run/anna-deploy/NAME, a
                      tmpfs),
                      booted with `systemd-nspawn --boot`; there is no machined on the
                      host, so it runs --register=no --keep-unit and is entered with
                      nsenter into its PID 1
    a machine's net   its own namespace: loopback only (`--private-network`), or one end of
                      a veth on a bridge in a hub namespace (`Lan`), so 10.0.0.0/24 of the
                      runbook example never meets the host's network

Everything is removed after, and leftovers of a killed run before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

ROOTFS_SUITE = "bookworm"
# systemd as PID 1 and what docs/operations.md's commands use.
ROOTFS_PACKAGES = (
    "systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,iproute2,procps,jq,curl,sudo"
)
RUN_DIR = Path("/run/anna-deploy")
BOOT_TIMEOUT = 60.0
POWEROFF_TIMEOUT = 30.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class MachineError(Exception):
    """A machine did not build, boot, answer or stop."""


def _check(argv: list[str], timeout: float = 60) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise MachineError(f"`{shlex.join(argv)}` exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def rootfs(cache: Path) -> Path:
    """The cached root filesystem, made by mmdebstrap first (≈45 s) if it is not there."""
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        f"--include={ROOTFS_PACKAGES}",
        ROOTFS_SUITE,
    ]
    key = hashlib.sha256(" ".join(argv).encode()).hexdigest()[:16]
    target = cache / f"rootfs-{key}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    building = cache / f"rootfs-{key}.building"
    shutil.rmtree(building, ignore_errors=True)
    _check([*argv, str(building)], timeout=900)
    building.rename(target)
    return target


@contextlib.contextmanager
def machine_space() -> Iterator[None]:
    """RUN_DIR as a tmpfs for the machines' writes (a disk would make every unmount wait
    for their pages to be written), emptied of a killed run's leftovers first."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    _clear_stale()
    if os.path.ismount(RUN_DIR):
        subprocess.run(["umount", "-l", str(RUN_DIR)], check=False, timeout=30)
    _check(["mount", "-t", "tmpfs", "-o", "mode=0755,size=50%", "anna-deploy", str(RUN_DIR)])
    try:
        yield
    finally:
        _clear_stale()
        subprocess.run(["umount", "-l", str(RUN_DIR)], check=False, timeout=30)


def _clear_stale() -> None:
    for folder in RUN_DIR.iterdir():
        root = folder / "root"
        if os.path.ismount(root):
            subprocess.run(["umount", "-l", str(root)], check=False, timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


class Machine:
    """One booted machine: `run` executes a shell command inside it as root."""

    def __init__(self, name: str, base: Path, *, netns: str | None = None) -> None:
        self.name = name
        self.base = base
        self.netns = netns
        self.folder = RUN_DIR / name
        self.root = self.folder / "root"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def path(self, inside: str) -> Path:
        """The host path of a file inside the machine."""
        return self.root / inside.lstrip("/")

    def boot(self) -> None:
        """Overlay the rootfs and start systemd-nspawn (wait_booted() waits for it)."""
        for part in ("upper", "work", "root"):
            (self.folder / part).mkdir(parents=True, exist_ok=True)
        options = (
            f"lowerdir={self.base},upperdir={self.folder / 'upper'},workdir={self.folder / 'work'}"
        )
        _check(["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)])
        self.path("/etc/hostname").write_text(f"{self.name}\n")
        self.path("/etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {self.name}\n")
        network = (
            [f"--network-namespace-path=/run/netns/{self.netns}"]
            if self.netns
            else ["--private-network"]
        )
        with (self.folder / "console.log").open("wb") as console:
            self._nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--console=passive",
                    f"--machine={self.name}",
                    f"--directory={self.root}",
                    *network,
                ],
                stdout=console,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_booted(self) -> None:
        """Until systemd inside has finished booting (running or degraded)."""
        assert self._nspawn is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not self.leader:
            if self._nspawn.poll() is not None or time.monotonic() > deadline:
                raise MachineError(f"{self.name} did not boot: {self.console_tail()}")
            children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
            with contextlib.suppress(OSError):
                pids = children.read_text().split()
                if pids and Path(f"/proc/{pids[0]}/comm").read_text().strip() == "systemd":
                    self.leader = int(pids[0])
            time.sleep(0.1)
        while True:  # until PID 1 answers systemctl (just after exec it does not yet:
            # systemctl then prints nothing, or "offline" when it cannot reach the manager)
            state = self.run(
                "systemctl is-system-running --wait", check=False, timeout=BOOT_TIMEOUT
            )
            if state.stdout.strip() in ("running", "degraded"):
                return
            not_yet = state.stdout.strip() in ("", "offline")
            if not not_yet or time.monotonic() > deadline:
                raise MachineError(
                    f"{self.name} booted into {state.stdout.strip()!r}: {state.stderr}"
                )
            time.sleep(0.1)

    def console_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.folder / "console.log").read_text(errors="replace")[-2000:]
        return "(no console output)"

    def run(
        self,
        command: str,
        *,
        cwd: str = "/root",
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """`bash -c command` inside, as root in a login-like environment; MachineError
        with the output when it fails and `check` is set."""
        assert self.leader, f"{self.name} is not booted"
        variables = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
        done = subprocess.run(
            [
                "nsenter",
                f"--target={self.leader}",
                "--all",
                "env",
                "-i",
                *(f"{key}={value}" for key, value in variables.items()),
                "bash",
                "-o",
                "pipefail",
                "-c",
                f"cd {shlex.quote(cwd)} || exit 1\n{command}",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise MachineError(
                f"{self.name}: `{command}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def request_poweroff(self) -> None:
        """`systemctl poweroff` inside (wait_off() waits for it)."""
        if self.leader and self._nspawn is not None and self._nspawn.poll() is None:
            self.run("systemctl poweroff", check=False, timeout=30)

    def wait_off(self) -> None:
        """Until the machine has stopped (SIGKILL to its PID 1 after POWEROFF_TIMEOUT), then
        unmount and remove everything of it."""
        try:
            if self._nspawn is not None:
                try:
                    self._nspawn.wait(POWEROFF_TIMEOUT)
                except subprocess.TimeoutExpired:
                    if self.leader:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.leader, signal.SIGKILL)  # its PID namespace goes with it
                    self._nspawn.kill()
                    self._nspawn.wait()
        finally:
            if os.path.ismount(self.root):
                subprocess.run(["umount", str(self.root)], check=False, timeout=30)
            if os.path.ismount(self.root):
                subprocess.run(["umount", "-l", str(self.root)], check=False, timeout=30)
            shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def booted(machines: list[Machine]) -> Iterator[list[Machine]]:
    """Boot them together; power every one off at the end, even after a failure."""
    try:
        for machine in machines:
            machine.boot()
        for machine in machines:
            machine.wait_booted()
        yield machines
    finally:
        for machine in machines:
            machine.request_poweroff()
        for machine in machines:
            machine.wait_off()


class Lan:
    """Namespaces PREFIX1..N on a bridge in namespace PREFIXhub; machine n is SUBNET.(10+n)."""

    def __init__(self, prefix: str, count: int, subnet: str = "10.0.0") -> None:
        self.prefix = prefix
        self.count = count
        self.subnet = subnet

    def namespace(self, n: int) -> str:
        return f"{self.prefix}{n}"

    def address(self, n: int) -> str:
        return f"{self.subnet}.{10 + n}"

    def create(self) -> None:
        self.destroy()
        hub = f"{self.prefix}hub"
        try:
            _check(["ip", "netns", "add", hub])
            _check(["ip", "-n", hub, "link", "add", "lan", "type", "bridge"])
            _check(["ip", "-n", hub, "link", "set", "lan", "up"])
            for n in range(1, self.count + 1):
                ns = self.namespace(n)
                _check(["ip", "netns", "add", ns])
                veth = ["link", "add", f"port{n}", "type", "veth", "peer", "eth0", "netns", ns]
                _check(["ip", "-n", hub, *veth])
                _check(["ip", "-n", hub, "link", "set", f"port{n}", "master", "lan", "up"])
                _check(["ip", "-n", ns, "addr", "add", f"{self.address(n)}/24", "dev", "eth0"])
                _check(["ip", "-n", ns, "link", "set", "eth0", "up"])
                _check(["ip", "-n", ns, "link", "set", "lo", "up"])
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Delete our namespaces; their veths and the bridge go with them."""
        listed = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
        for line in listed.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(self.prefix):
                subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)
