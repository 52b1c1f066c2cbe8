"""Durable file writes: the one place anna_trio calls fsync.

A write survives power loss only once its data is fsynced, and a new or renamed file
only once its directory is too (the name lives in the directory). So files are written
temp → fsync → rename → fsync(dir), new files and directories get their parent
fsynced, and the node database's WAL is fsynced through `fsync_wal`.

Everything here blocks on the disk: the daemon calls it from worker threads
(`trio.to_thread`), never on the event loop.

``ANNA_UNSAFE_NO_FSYNC=1`` in the environment skips one fsync: the node database WAL's
(`fsync_wal`), the one every 2xx answer and every own signature waits for (etcd's
``--unsafe-no-fsync`` does the same to its WAL). It exists for one purpose: the
power-loss suite shows with it that it does catch the loss of acknowledged data. Everything else stays synced: the audit log and its chain-head
anchor, which must agree after a power cut (an anchor naming entries the log lost makes
annad refuse to start, before any loss could be checked), the audit_id reservation,
state.json, keys and directories. A process started with it logs a warning saying so.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

UNSAFE_ENV = "ANNA_UNSAFE_NO_FSYNC"
SKIP_FSYNC = os.environ.get(UNSAFE_ENV) == "1"

_log = logging.getLogger(__name__)


def warn_if_unsafe() -> None:
    """Say loudly at start-up that what this process acknowledges may not survive a
    power cut."""
    if SKIP_FSYNC:
        _log.warning(
            "%s=1: the WAL's fsync is OFF - acknowledged data is lost at a power cut (tests only)",
            UNSAFE_ENV,
        )


def fsync(fd: int) -> None:
    os.fsync(fd)


def fsync_wal(fd: int) -> None:
    """fsync the node database's WAL, unless the unsafe test switch is on."""
    if not SKIP_FSYNC:
        os.fsync(fd)


def fsync_path(path: Path) -> None:
    """fsync a file (or, opened as one, a directory) by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make creations, renames and removals in ``directory`` durable."""
    fsync_path(directory)


def make_dirs(directory: Path, mode: int = 0o777) -> None:
    """`mkdir -p` whose every new directory is durable: each one's parent is fsynced."""
    missing = []
    path = directory
    while not path.exists():
        missing.append(path)
        path = path.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=mode)
        except FileExistsError:
            continue
        fsync_dir(new.parent)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    fsync(fd)


def write_synced(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` through an fsynced temp file and a rename.

    Readers see the old bytes or the new ones, never a mix; ``mode`` is set before any
    byte lands, so a key is never briefly readable by others. The rename is durable only
    after `fsync_dir`: callers writing several files may sync the directory once.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
            _write_fd(fd, data)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp, fsync, rename, fsync dir)."""
    write_synced(path, data, mode=mode)
    fsync_dir(path.parent)


def create_new(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Create ``path``, which must not exist, with ``data``; durable with its name."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        _write_fd(fd, data)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
