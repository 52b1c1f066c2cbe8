"""Durable node data: rounds, observations, evidence, own signed observations, idempotency.

SQLite in WAL mode. Writes go through a group-commit writer: callers queue their
statements and wait; one transaction commits every queued batch and one fsync of the
WAL makes it durable, so a burst of observations costs one commit and one fsync, not
one each. `commit` returns only after that fsync: what a 2xx answer acknowledges, and
this node's own signed observation before it leaves the process, is on stable storage
(etcd fsyncs its WAL before acknowledging, CometBFT its sign-state before signing).

The transaction itself runs on the Trio thread (a page-cache append of tens of µs, with
``synchronous=NORMAL``: SQLite syncs nothing at commit); the fsync runs on a worker
thread on a descriptor of the WAL file of our own, so the event loop goes on, and reads
on the Trio thread never wait behind it. The next batch, queued meanwhile, is committed
and fsynced as soon as it returns. A WAL checkpoint, which fsyncs the WAL and the
database file, is taken away from SQLite's auto-checkpoint and run every
CHECKPOINT_EVERY commits on a worker thread, on a connection of its own.

An fsync that fails ends the writer and so the daemon: after a failed fsync the kernel
may have dropped the dirty pages, and nothing written since can be trusted as durable.

The file and its fsyncs are the store's `Disk` (`FileDisk`); the cluster simulator puts
the same store on a disk of its own that loses what was not synced at a power cut.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from . import durable, failpoints
from .models import Evidence, Observation, parse_evidence, parse_observation

SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round_id TEXT PRIMARY KEY,
    window_hours INTEGER NOT NULL,
    learned_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS observations (
    round_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (round_id, node_id, digest)
);
CREATE TABLE IF NOT EXISTS evidence (
    node_id TEXT NOT NULL,
    round_id TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (node_id, round_id)
);
CREATE TABLE IF NOT EXISTS own (
    round_id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_intents (
    key TEXT PRIMARY KEY,
    event TEXT NOT NULL,
    fields TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    status INTEGER NOT NULL,
    body TEXT NOT NULL
);
"""
# Added since the first release: create_schema adds them to an older database.
IDEMPOTENCY_COLUMNS = {
    "fingerprint": "fingerprint TEXT NOT NULL DEFAULT ''",
    "created_at": "created_at REAL NOT NULL DEFAULT 0",
}


def create_schema(db: sqlite3.Connection) -> None:
    """The tables (and the columns later versions added) on a new or older database."""
    db.executescript(SCHEMA)
    have = {row[1] for row in db.execute("PRAGMA table_info(idempotency)")}
    for name, column in IDEMPOTENCY_COLUMNS.items():
        if name not in have:
            db.execute(f"ALTER TABLE idempotency ADD COLUMN {column}")
    db.execute("CREATE INDEX IF NOT EXISTS idempotency_age ON idempotency (created_at)")


@attrs.frozen
class StoredAnswer:
    """An Idempotency-Key's answer: what a repeat gets, byte for byte, if its request
    body is the same (`body` is the JSON answer as it was sent)."""

    status: int
    body: bytes
    fingerprint: str
    created_at: float


Statement = tuple[str, tuple[Any, ...]]

# Commits between WAL checkpoints: a round's commit appends 2–5 pages, so about SQLite's
# own auto-checkpoint size of 1000 pages.
CHECKPOINT_EVERY = 256


def _intent_key(event: str, fields: dict[str, Any]) -> str:
    return json.dumps([event, fields], sort_keys=True, separators=(",", ":"))


def _obs_json(obs: Observation) -> str:
    return json.dumps(obs.to_dict(), separators=(",", ":"))


@attrs.frozen
class StoredData:
    """Everything a restarting node replays into its engine."""

    rounds: list[tuple[str, int]]
    observations: list[Observation]
    evidence: list[Evidence]
    own: dict[str, Observation]
    own_not_loaded_through: str  # highest round id with an own row not in `own` ("" if none)
    max_own_audit_id: int


class Disk(Protocol):
    """What the store's database lives on: SQLite on a file (`FileDisk`), or the
    simulator's disk, which keeps what was synced and loses the rest at a power cut."""

    @property
    def db(self) -> sqlite3.Connection:
        """The connection reads and `write` use, its schema created."""
        ...

    def write(self, statements: Iterable[Statement]) -> None:
        """One transaction, committed (not yet durable) before this returns."""
        ...

    async def sync(self) -> None:
        """Make every committed transaction durable."""
        ...

    async def checkpoint(self) -> None:
        """Housekeeping every CHECKPOINT_EVERY commits (a WAL checkpoint)."""
        ...

    def close(self) -> None: ...


class FileDisk:
    """SQLite in WAL mode on a file; the WAL's fsync and checkpoints on worker threads."""

    def __init__(self, path: Path) -> None:
        durable.make_dirs(path.parent)
        created = not path.exists()
        self._db = _connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints: see `checkpoint`
        create_schema(self._db)
        # The WAL file outlives every checkpoint (TRUNCATE empties it in place) while a
        # connection is open, so this descriptor stays the WAL's for the disk's life.
        self._wal_fd = os.open(f"{path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        durable.fsync(self._wal_fd)
        if created:
            durable.fsync_path(path)  # the header that says WAL mode
        durable.fsync_dir(path.parent)  # the database and its WAL exist after a power cut
        self._checkpointer = _connect(path)
        self._closed = False

    @property
    def db(self) -> sqlite3.Connection:
        return self._db

    def write(self, statements: Iterable[Statement]) -> None:
        with _Transaction(self._db):
            for sql, params in statements:
                self._db.execute(sql, params)

    async def sync(self) -> None:
        """fsync the WAL on a worker thread: the event loop goes on meanwhile."""
        await trio.to_thread.run_sync(self.sync_now, abandon_on_cancel=False)

    def sync_now(self) -> None:
        durable.fsync_wal(self._wal_fd)

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file (it fsyncs both) on a worker thread. New
        commits wait meanwhile (a few ms every CHECKPOINT_EVERY commits): a checkpoint
        racing the writer never catches up under load, and SQLite only starts the WAL
        over once one has copied every frame — the WAL grew past 130 MB in a run."""
        await trio.to_thread.run_sync(self.checkpoint_now, abandon_on_cancel=False)

    def checkpoint_now(self) -> tuple[int, int, int]:
        """TRUNCATE: copy every WAL frame into the database, then empty the WAL file (it
        waits for readers, which take µs). Returns (busy, WAL frames, frames copied)."""
        busy, frames, copied = self._checkpointer.execute(
            "PRAGMA wal_checkpoint(TRUNCATE)"
        ).fetchone()
        return int(busy), int(frames), int(copied)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._checkpointer.close()
            self._db.close()
            os.close(self._wal_fd)


def _connect(path: Path | str) -> sqlite3.Connection:
    return sqlite3.connect(path, check_same_thread=False, isolation_level=None)


class Store:
    """The node's database, on a `Disk`. Open it at start-up (`Store.on_file`); write
    with `await commit(...)`, which returns once the rows are durable."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self._db = disk.db
        self._commits_since_checkpoint = 0
        self._pending: list[Statement] = []
        self._batch_done = trio.Event()
        self._wakeup = trio.Event()
        self._stopped = False  # the writer task has ended
        self._failed = False  # a commit or an fsync failed: nothing more is committed

    @classmethod
    def on_file(cls, path: Path) -> Store:
        """The store of a node database file (blocking: creating it fsyncs)."""
        return cls(FileDisk(path))

    # --- statements ---------------------------------------------------------------

    @staticmethod
    def round_stmt(round_id: str, window_hours: int, learned_at: float) -> Statement:
        return (
            "INSERT OR IGNORE INTO rounds VALUES (?, ?, ?)",
            (round_id, window_hours, learned_at),
        )

    @staticmethod
    def observation_stmt(obs: Observation, digest: str) -> Statement:
        return (
            "INSERT OR IGNORE INTO observations VALUES (?, ?, ?, ?)",
            (obs.round_id, obs.node_id, digest, _obs_json(obs)),
        )

    @staticmethod
    def evidence_stmt(evidence: Evidence) -> Statement:
        body = json.dumps(
            {"first": evidence.first.to_dict(), "second": evidence.second.to_dict()},
            separators=(",", ":"),
        )
        return (
            "INSERT OR IGNORE INTO evidence VALUES (?, ?, ?)",
            (evidence.node_id, evidence.round_id, body),
        )

    @staticmethod
    def audit_intent_stmt(event: str, fields: dict[str, Any]) -> Statement:
        """An audit entry a decision committed with it calls for, until it is written
        (`audit_done_stmt`): a process that dies between the commit and the append
        writes it at its next start."""
        return (
            "INSERT OR IGNORE INTO audit_intents VALUES (?, ?, ?)",
            (_intent_key(event, fields), event, json.dumps(fields, sort_keys=True)),
        )

    @staticmethod
    def audit_done_stmt(event: str, fields: dict[str, Any]) -> Statement:
        return ("DELETE FROM audit_intents WHERE key = ?", (_intent_key(event, fields),))

    def audit_intents(self) -> list[tuple[str, dict[str, Any]]]:
        """(event, fields) of the audit entries committed decisions still call for."""
        return [
            (str(event), json.loads(fields))
            for event, fields in self._db.execute(
                "SELECT event, fields FROM audit_intents ORDER BY rowid"
            )
        ]

    @staticmethod
    def own_stmt(obs: Observation) -> Statement:
        return ("INSERT OR IGNORE INTO own VALUES (?, ?)", (obs.round_id, _obs_json(obs)))

    @staticmethod
    def idempotency_stmt(key: str, answer: StoredAnswer) -> Statement:
        return (
            "INSERT OR IGNORE INTO idempotency (key, status, body, fingerprint, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                key,
                answer.status,
                answer.body.decode(),
                answer.fingerprint,
                answer.created_at,
            ),
        )

    @staticmethod
    def idempotency_expiry_stmts(stored_before: float, keep_at_most: int) -> list[Statement]:
        """Forget keys stored before `stored_before`, then all but the newest `keep_at_most`."""
        return [
            ("DELETE FROM idempotency WHERE created_at < ?", (stored_before,)),
            (
                "DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency "
                "ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                (keep_at_most,),
            ),
        ]

    # --- writing ------------------------------------------------------------------

    async def commit(self, statements: Iterable[Statement]) -> None:
        """Return once every statement is durably committed (group commit). After the
        writer has been cancelled (shutdown), a late committer — a shielded step —
        commits on its own task."""
        if self._failed:
            raise trio.ClosedResourceError("the store's writer failed; nothing is committed")
        self._pending.extend(statements)
        if self._stopped:
            await self._commit_pending()
            return
        done = self._batch_done
        self._wakeup.set()
        await done.wait()
        if self._failed:
            raise trio.ClosedResourceError("the store's writer failed before this commit")

    async def flush(self) -> None:
        """Return once everything queued before this call is durable."""
        await self.commit(())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer loop: commits queued batches one transaction at a time.

        Cancelled, it first commits what is still queued (shielded: one transaction and
        one fsync), so no committer it leaves behind — a shielded step of the node — is
        left waiting. If a commit or an fsync fails, the writer stops there and every
        committer gets ClosedResourceError."""
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                # One scheduling pass first: tasks woken with the committer (a round's own
                # signing alongside the gossip that opened it) join this transaction.
                await trio.lowlevel.cancel_shielded_checkpoint()
                self._wakeup = trio.Event()
                await self._commit_pending()
                if self._commits_since_checkpoint >= CHECKPOINT_EVERY:
                    self._commits_since_checkpoint = 0
                    await self.disk.checkpoint()
        finally:
            self._stopped = True
            if not self._failed:
                with trio.CancelScope(shield=True):
                    await self._commit_pending()
            self._batch_done.set()

    async def _commit_pending(self) -> None:
        batch, self._pending = self._pending, []
        done, self._batch_done = self._batch_done, trio.Event()
        try:
            if batch:
                await self._write(batch)
                await self._sync()
                await failpoints.hit_async("store.after_sync")
                self._commits_since_checkpoint += 1
        except BaseException:
            self._failed = True
            raise
        finally:
            done.set()

    async def _write(self, batch: list[Statement]) -> None:
        """One transaction, here on the Trio thread: a WAL append, not yet durable."""
        await failpoints.hit_async("store.before_commit")
        self.disk.write(batch)
        await failpoints.hit_async("store.after_commit")

    async def _sync(self) -> None:
        await self.disk.sync()

    def write_now(self, statements: Iterable[Statement]) -> None:
        """One transaction, committed (not yet durable) before this returns (tools, tests)."""
        self.disk.write(statements)

    # --- reading ------------------------------------------------------------------

    def load(self, keep_rounds: int) -> StoredData:
        """The most recent `keep_rounds` rounds with their observations, all evidence."""
        rounds = [
            (str(r), int(w))
            for r, w in reversed(
                self._db.execute(
                    "SELECT round_id, window_hours FROM rounds ORDER BY round_id DESC LIMIT ?",
                    (keep_rounds,),
                ).fetchall()
            )
        ]
        oldest = rounds[0][0] if rounds else ""
        observations = [
            parse_observation(json.loads(body))
            for (body,) in self._db.execute(
                "SELECT body FROM observations WHERE round_id >= ? ORDER BY round_id", (oldest,)
            )
        ]
        evidence = [
            self._parse_evidence(body) for (body,) in self._db.execute("SELECT body FROM evidence")
        ]
        own = {
            str(rid): parse_observation(json.loads(body))
            for rid, body in self._db.execute(
                "SELECT round_id, body FROM own WHERE round_id >= ?", (oldest,)
            )
        }
        (below,) = self._db.execute(
            "SELECT MAX(round_id) FROM own WHERE round_id < ?", (oldest,)
        ).fetchone()
        return StoredData(rounds, observations, evidence, own, below or "", self.max_own_audit_id())

    def max_own_audit_id(self) -> int:
        """Highest audit_id this node ever signed an observation with (0 if none)."""
        return _max_own_audit_id(self._db)

    @staticmethod
    def peek_max_own_audit_id(path: Path) -> int:
        """The same, read-only, without creating the database (before the migration)."""
        if not path.exists():
            return 0
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return _max_own_audit_id(db)
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()

    @staticmethod
    def _parse_evidence(body: str) -> Evidence:
        return parse_evidence(json.loads(body))

    def own_observation(self, round_id: str) -> Observation | None:
        row = self._db.execute("SELECT body FROM own WHERE round_id = ?", (round_id,)).fetchone()
        return parse_observation(json.loads(row[0])) if row else None

    def round_observations(self, round_id: str) -> tuple[int, list[Observation]] | None:
        """A round that may have left the engine's memory: (window_hours, observations)."""
        row = self._db.execute(
            "SELECT window_hours FROM rounds WHERE round_id = ?", (round_id,)
        ).fetchone()
        if row is None:
            return None
        bodies = self._db.execute(
            "SELECT body FROM observations WHERE round_id = ?", (round_id,)
        ).fetchall()
        return int(row[0]), [parse_observation(json.loads(b)) for (b,) in bodies]

    def idempotent_answer(self, key: str) -> StoredAnswer | None:
        row = self._db.execute(
            "SELECT status, body, fingerprint, created_at FROM idempotency WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        return StoredAnswer(int(row[0]), str(row[1]).encode(), str(row[2]), float(row[3]))

    def idempotency_keys(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM idempotency").fetchone()
        return int(count)

    def close(self) -> None:
        self.disk.close()


def _max_own_audit_id(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT MAX(json_extract(body, '$.audit_id')) FROM own").fetchone()
    return int(row[0] or 0)


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
