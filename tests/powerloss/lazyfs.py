"""LazyFS for the power-loss suite: built once into a cache directory, one mount per node.

LazyFS (a FUSE filesystem, MIT, the tool Jepsen uses on etcd) keeps every byte written
through it in its own page cache until the writer fsyncs; `lazyfs::clear-cache` drops
whatever was never synced, as a machine losing power does. Its sources and an offline
`build.sh` live outside the project, in `shared/tools/lazyfs/` beside (or above) the
repository, or wherever ANNA_LAZYFS_TOOLS points; the build goes to ANNA_LAZYFS_CACHE
(default ~/.cache/anna-trio/lazyfs) and is reused by every later run.

Everything here raises LazyFSUnavailable when the machine cannot do it (no compiler, no
/dev/fuse, not root), so the suite can fail in CI and skip elsewhere, saying why.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ANNA_LAZYFS_CACHE") or Path.home() / ".cache" / "anna-trio" / "lazyfs")
BUILD_TIMEOUT = 900.0
READY_TIMEOUT = 20.0
COMMAND_TIMEOUT = 10.0
CACHE_SIZE = "64mb"  # per mount, allocated up front; a scenario writes a few MB at most
READY_LINE = "waiting for fault commands"
CLEARED_LINE = "cache is cleared"


class LazyFSUnavailable(Exception):
    """Raised when LazyFS cannot be built, mounted, or does not drop un-synced data."""


def build_script() -> Path:
    """LazyFS's `build.sh`: ANNA_LAZYFS_TOOLS, else the first `shared/tools/lazyfs/` found
    walking up from the repository (a worktree may sit a level deeper than main)."""
    configured = os.environ.get("ANNA_LAZYFS_TOOLS")
    candidates = (
        [Path(configured)]
        if configured
        else [parent / "shared" / "tools" / "lazyfs" for parent in REPOSITORY.parents]
    )
    for directory in candidates:
        if (directory / "build.sh").is_file():
            return directory / "build.sh"
    where = configured or f"shared/tools/lazyfs/ above {REPOSITORY}"
    raise LazyFSUnavailable(f"no LazyFS build.sh in {where} (set ANNA_LAZYFS_TOOLS)")


def build() -> Path:
    """The lazyfs binary, built on first use (about 75 s on 2 cores) under a lock, so two
    sessions sharing the cache never build it twice."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE.parent / f"{CACHE.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        binary = CACHE / "lazyfs" / "build" / "lazyfs"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
        script = build_script()
        missing = [tool for tool in ("g++", "cmake") if shutil.which(tool) is None]
        if not Path("/usr/include/fuse3/fuse.h").exists():
            missing.append("libfuse3-dev")
        if missing:
            raise LazyFSUnavailable(
                f"cannot build LazyFS: {', '.join(missing)} missing "
                "(apt-get install -y g++ cmake libfuse3-dev fuse3)"
            )
        try:
            done = subprocess.run(
                ["bash", str(script), str(CACHE)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LazyFSUnavailable(f"LazyFS build took over {BUILD_TIMEOUT:.0f} s") from exc
        if done.returncode != 0 or not binary.is_file():
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise LazyFSUnavailable(f"LazyFS build failed ({script}):\n{tail}")
        return binary


def check_fuse() -> None:
    """What a mount needs: root (the mounts use allow_other), /dev/fuse, fusermount3."""
    if os.geteuid() != 0:
        raise LazyFSUnavailable("LazyFS mounts need root (allow_other, /dev/fuse)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise LazyFSUnavailable("/dev/fuse is missing or not usable (FUSE in this kernel?)")
    if shutil.which("fusermount3") is None:
        raise LazyFSUnavailable("fusermount3 is missing (apt-get install -y fuse3)")


class Mount:
    """One LazyFS mount: `backing` seen through `mountpoint`, its cache and its fifo in
    `workdir`. `mount()` waits until LazyFS takes commands; `unmount()` always cleans up."""

    def __init__(self, binary: Path, backing: Path, mountpoint: Path, workdir: Path) -> None:
        self.binary = binary
        self.backing = backing
        self.mountpoint = mountpoint
        self.workdir = workdir
        self.fifo = workdir / "faults.fifo"
        self.output = workdir / "lazyfs.out"
        self._process: subprocess.Popen[bytes] | None = None

    def mount(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "lazyfs.toml"
        config.write_text(
            "[faults]\n"
            f'fifo_path="{self.fifo}"\n'
            "[cache]\n"
            "apply_eviction=false\n"
            "[cache.simple]\n"
            f'custom_size="{CACHE_SIZE}"\n'
            "blocks_per_page=1\n"
            "[filesystem]\n"
            "log_all_operations=false\n"
            f'logfile="{self.workdir / "lazyfs.log"}"\n'
        )
        with self.output.open("wb") as out:
            self._process = subprocess.Popen(
                [
                    # LazyFS aborts when it stops (a joinable std::thread): no core files
                    # of its 64 MB cache, whatever the machine's core limit.
                    "sh",
                    "-c",
                    'ulimit -c 0 && exec "$0" "$@"',
                    str(self.binary),
                    str(self.mountpoint),
                    # Relative, from cwd: LazyFS ignores a config path containing "-o"
                    # (case-insensitive), which pytest's /tmp/pytest-of-root/... does.
                    "--config-path",
                    config.name,
                    "-o",
                    "allow_other",
                    "-o",
                    "modules=subdir",
                    "-o",
                    f"subdir={self.backing}",
                    "-f",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
            )
        try:
            self._wait_for(READY_LINE, 1, READY_TIMEOUT)
        except LazyFSUnavailable:
            self.unmount()
            raise

    def clear_cache(self) -> None:
        """The power cut: drop every byte written through the mount and never fsynced."""
        self._command("lazyfs::clear-cache", CLEARED_LINE)

    def unmount(self) -> None:
        """Unmount (lazily when busy) and end the LazyFS process; safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            done = subprocess.run(
                ["fusermount3", "-u", str(self.mountpoint)], capture_output=True, check=False
            )
            if done.returncode != 0:
                subprocess.run(
                    ["fusermount3", "-uz", str(self.mountpoint)], capture_output=True, check=False
                )
        try:
            process.wait(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # A LazyFS that died on its own leaves a dead mount ("transport endpoint is not
        # connected"); take it away too.
        subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)

    def tail(self, lines: int = 10) -> str:
        try:
            text = self.output.read_text(errors="replace")
        except OSError:
            return "(no LazyFS output)"
        return "\n".join(text.splitlines()[-lines:])

    def _command(self, command: str, answer: str) -> None:
        seen = self._count(answer)
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:  # ENXIO: LazyFS is between two reads of its fifo
                if time.monotonic() > deadline or not self._running():
                    raise LazyFSUnavailable(
                        f"LazyFS does not read {self.fifo}:\n{self.tail()}"
                    ) from None
                time.sleep(0.005)
        try:
            os.write(fd, f"{command}\n".encode())
        finally:
            os.close(fd)
        self._wait_for(answer, seen + 1, COMMAND_TIMEOUT)

    def _running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _count(self, line: str) -> int:
        with contextlib.suppress(OSError):
            return self.output.read_text(errors="replace").count(line)
        return 0

    def _wait_for(self, line: str, times: int, within: float) -> None:
        """LazyFS answers on its stdout (its completion fifo is opened once, at start)."""
        deadline = time.monotonic() + within
        while self._count(line) < times:
            if not self._running():
                raise LazyFSUnavailable(f"LazyFS exited:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise LazyFSUnavailable(f"LazyFS did not say {line!r} in {within:.0f} s")
            time.sleep(0.005)


def probe(binary: Path, directory: Path) -> None:
    """Mount once and check that a power cut drops un-synced bytes and keeps synced ones:
    a LazyFS that keeps everything would make every power-loss test pass."""
    check_fuse()
    mount = Mount(binary, directory / "backing", directory / "mnt", directory / "lazyfs")
    mount.mount()
    try:
        (mount.mountpoint / "unsynced").write_bytes(b"lost at the power cut")
        fd = os.open(mount.mountpoint / "synced", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"kept")
            os.fsync(fd)
        finally:
            os.close(fd)
        mount.clear_cache()
        unsynced = (mount.mountpoint / "unsynced").read_bytes()
        synced = (mount.mountpoint / "synced").read_bytes()
    finally:
        mount.unmount()
    if unsynced or synced != b"kept":
        raise LazyFSUnavailable(
            f"LazyFS did not simulate a power cut (un-synced file holds {unsynced!r}, "
            f"synced one {synced!r})"
        )
