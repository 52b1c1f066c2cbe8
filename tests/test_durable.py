"""Files and directories are durable: data fsynced before a rename, new files and
directories with their parent fsynced (LazyFS cannot show a lost directory entry, so
these tests record the fsync calls themselves)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from anna_trio import crypto, durable
from anna_trio.audit import AuditIdAllocator, AuditLog, anchor_path
from anna_trio.durable import atomic_write_bytes
from anna_trio.store import Store


class FsyncRecorder:
    """Every path fsynced (a directory is fsynced as a file opened on it), in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[Path] = []
        real = os.fsync

        def record(fd: int) -> None:
            self.paths.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        monkeypatch.setattr(os, "fsync", record)

    def synced(self, path: Path) -> bool:
        return path.resolve() in self.paths


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[FsyncRecorder]:
    yield FsyncRecorder(monkeypatch)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    """atomic_write_bytes writes the new bytes and leaves no temp file behind."""
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_write_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If fsync fails, the target keeps its old bytes and the temp file is removed."""
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_write_syncs_the_data_then_the_directory(
    tmp_path: Path, fsyncs: FsyncRecorder
) -> None:
    atomic_write_bytes(tmp_path / "state.json", b"new")
    assert len(fsyncs.paths) == 2
    assert fsyncs.paths[0].name.endswith(".tmp")  # the data, before the rename
    assert fsyncs.paths[1] == tmp_path.resolve()  # the rename


def test_new_directories_are_synced_in_their_parents(tmp_path: Path, fsyncs: FsyncRecorder) -> None:
    durable.make_dirs(tmp_path / "a" / "b" / "c")
    assert fsyncs.paths == [tmp_path.resolve(), tmp_path / "a", tmp_path / "a" / "b"]
    fsyncs.paths.clear()
    durable.make_dirs(tmp_path / "a" / "b")
    assert fsyncs.paths == []  # nothing new, nothing to sync


def test_a_new_node_key_is_durable_with_its_directory_entries(
    tmp_path: Path, fsyncs: FsyncRecorder
) -> None:
    """The key, keys/ and the state dir: a key lost at a power cut would make the node
    sign with a new one its peers do not know."""
    state_dir = tmp_path / "state"
    keys = state_dir / "keys"
    crypto.create_keypair(keys)
    secret, public = keys / crypto.SECRET_KEY_FILE, keys / crypto.PUBLIC_KEY_FILE
    named = [p.name if p.parent == keys else p for p in fsyncs.paths]
    assert named[:2] == [tmp_path, state_dir]  # the new directories, in their parents
    assert named[2:4] == [secret.name, keys]  # the secret key's data, then its name
    assert str(named[4]).startswith(f".{public.name}.") and named[5] == keys  # the public key's
    assert len(named) == 6
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / crypto.SECRET_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((keys / crypto.PUBLIC_KEY_FILE).stat().st_mode) == 0o644


def test_a_new_audit_log_and_its_anchor_are_durable(tmp_path: Path, fsyncs: FsyncRecorder) -> None:
    path = tmp_path / "log" / "audit.jsonl"
    log = AuditLog.open(path, "node_001", AuditIdAllocator())
    assert fsyncs.synced(tmp_path) and fsyncs.synced(path.parent)  # the new dir and file
    fsyncs.paths.clear()
    log.append("daemon_start", {})
    log.close()
    assert fsyncs.paths[0] == path.resolve()  # the entry, before its anchor
    assert fsyncs.paths[-1] == path.parent.resolve()  # the anchor's rename
    assert anchor_path(path).exists()


def test_a_new_store_is_durable_with_its_wal_and_directory(
    tmp_path: Path, fsyncs: FsyncRecorder
) -> None:
    path = tmp_path / "state" / "node.db"
    Store.on_file(path).close()
    for synced in (tmp_path, path, Path(f"{path}-wal"), path.parent):
        assert fsyncs.synced(synced), synced


def test_the_unsafe_switch_skips_the_wal_fsync_only_and_says_so(tmp_path: Path) -> None:
    """ANNA_UNSAFE_NO_FSYNC=1 (the power-loss suite's proof that it can fail) turns off
    the WAL's fsync alone. The audit log stays synced with its anchor: a synced anchor
    naming entries an unsynced log lost would keep the node from starting after the cut,
    so the proof would stop there instead of at the lost data."""
    script = (
        "import os, logging, sys\n"
        "from pathlib import Path\n"
        "synced = []\n"
        "real = os.fsync\n"
        "os.fsync = lambda fd: (synced.append(os.readlink(f'/proc/self/fd/{fd}')), real(fd))\n"
        "logging.basicConfig()\n"
        "from anna_trio import durable\n"
        "from anna_trio.audit import AuditIdAllocator, AuditLog\n"
        "from anna_trio.store import Store\n"
        "durable.warn_if_unsafe()\n"
        "base = Path(sys.argv[1])\n"
        "log = AuditLog.open(base / 'audit.jsonl', 'n', AuditIdAllocator())\n"
        "log.append('daemon_start', {})\n"
        "store = Store.on_file(base / 'node.db')\n"
        "store.write_now([Store.round_stmt('r', 24, 0.0)])\n"
        "synced.clear()\n"
        "store.disk.sync_now()\n"
        "log.append('daemon_stop', {})\n"
        "print(' '.join(sorted({Path(p).name for p in synced})))\n"
    )
    runs = {}
    for name, env in (("safe", {}), ("unsafe", {durable.UNSAFE_ENV: "1"})):
        (tmp_path / name).mkdir()
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / name)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        runs[name] = (done.stdout.split(), "fsync is OFF" in done.stderr)
    safe, warned = runs["safe"]
    assert {"audit.jsonl", "node.db-wal"} <= set(safe) and not warned
    unsafe, warned = runs["unsafe"]
    assert warned and "node.db-wal" not in unsafe
    assert "audit.jsonl" in unsafe  # the log's entry, then its anchor's data and rename
    assert any(n.startswith(".audit.jsonl.head.") for n in unsafe) and "unsafe" in unsafe
