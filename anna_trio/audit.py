"""The hash-chained audit log (SPEC §4) and the node's audit_id allocator (SPEC §3).

One JSON object per line. Each entry's ``hash`` is
``sha256(prev_hash + canonical JSON of the entry without "hash")`` and the next entry
carries it as ``prev_hash``, so an edited, removed or reordered line breaks the chain at
that line. The first entry's ``prev_hash`` is 64 zeros.

Opening reads only the tail (the log may be gigabytes); a torn last line left by kill -9
mid-write is cut away. Every entry records a decision, so each append is one ``write()``
on an ``O_APPEND`` descriptor followed by an fsync.

Removing lines from the end leaves a valid chain, so the chain head (audit_id and hash
of the last entry) is also anchored in a small file beside the log, ``<log>.head``,
rewritten atomically after each fsynced entry: a log that ends before its anchor was
truncated. The anchor lives outside state.json, whose v1 bytes a rollback restores.

audit_ids are shared with the node's signed observations and handed out only below a
durable reservation (`IdReservation`, a block at a time), so after a power cut the
sequence resumes above every id that may have been seen, written or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

from . import durable, failpoints
from ._exceptions import StateError
from .models import format_utc_ms
from .seams import BlockingRunner

GENESIS_HASH = "0" * 64
RESERVED_FIELDS = frozenset({"audit_id", "timestamp", "node_id", "event", "prev_hash", "hash"})
_TAIL_CHUNK = 64 * 1024
ANCHOR_SUFFIX = ".head"
RESERVATION_BLOCK = 1000  # ids reserved per fsync: one reservation every ~1000 rounds

_log = logging.getLogger(__name__)


def canonical_json(value: Any) -> str:
    """The one encoding hashes are computed over: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def entry_hash(prev_hash: str, entry_without_hash: dict[str, Any]) -> str:
    """sha256(prev_hash + canonical JSON of the entry without "hash"), hex."""
    return hashlib.sha256((prev_hash + canonical_json(entry_without_hash)).encode()).hexdigest()


def utc_now_rfc3339() -> str:
    """Now as RFC 3339 UTC with milliseconds and a `Z`."""
    return format_utc_ms(time.time())


class IdReservation:
    """The durable high-water mark of audit_ids: no id above it was ever handed out.

    One small file, replaced atomically; blocking (worker threads and start-up only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> int:
        """The recorded mark, 0 when there is none yet; StateError when unreadable."""
        try:
            text = self.path.read_text("ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"cannot read audit_id reservation {self.path}: {exc}") from exc
        if not text.isdigit():
            raise StateError(f"audit_id reservation {self.path} is not an integer: {text[:40]!r}")
        return int(text)

    def write(self, through: int) -> None:
        durable.atomic_write_bytes(self.path, f"{through}\n".encode())


class AuditIdAllocator:
    """This node's strictly increasing audit_id sequence, shared by audit entries and
    signed observations. Thread-safe: the daemon allocates from worker threads too.

    With a reservation, ids are handed out only below its durable mark, which moves a
    block at a time; without one (tests, tools on a scratch log) the sequence is in
    memory only."""

    def __init__(
        self,
        floor: int = 0,
        reservation: IdReservation | None = None,
        *,
        run_blocking: BlockingRunner = trio.to_thread.run_sync,
    ) -> None:
        self._reservation = reservation
        self._run_blocking = run_blocking
        if reservation is not None:
            floor = max(floor, reservation.read())  # ids up to it may have been seen
        self._last = floor
        self._reserved = floor if reservation is not None else None
        self._lock = threading.Lock()  # held for a few operations only, never for I/O
        self._reserving = threading.Lock()  # one reservation write at a time

    def _take(self) -> int | None:
        with self._lock:
            if self._reserved is not None and self._last >= self._reserved:
                return None
            self._last += 1
            return self._last

    def next(self) -> int:
        """The next unused id, never handed out twice; may block on a reservation (worker
        threads and tools only: on the event loop use `next_async`)."""
        while (taken := self._take()) is None:
            self._extend()
        return taken

    async def next_async(self) -> int:
        """`next` for the event loop: a reservation's fsync runs on a worker thread."""
        while (taken := self._take()) is None:
            await self._run_blocking(self._extend)
        return taken

    def _extend(self) -> None:
        assert self._reservation is not None
        with self._reserving:
            with self._lock:
                assert self._reserved is not None
                if self._last < self._reserved:
                    return  # another thread extended it meanwhile
                target = self._last + RESERVATION_BLOCK
            self._reservation.write(target)
            with self._lock:
                self._reserved = max(self._reserved, target)

    def release(self) -> None:
        """Give back the reserved ids never handed out, once this process takes no more
        (a clean exit): the next start resumes right after the last id used, and only a
        crash leaves a gap in the sequence."""
        if self._reservation is None:
            return
        with self._reserving:
            if self._reserved is not None and self._reserved > self._last:
                self._reservation.write(self._last)
                with self._lock:
                    self._reserved = self._last

    def raise_floor(self, used: int) -> None:
        """Record that ``used`` is taken; the sequence never goes back."""
        with self._lock:
            self._last = max(self._last, used)

    @property
    def last(self) -> int:
        return self._last


@attrs.frozen
class AuditVerification:
    """What `verify_audit_log` found; `first_bad_line` is 1-based. `verified_bytes` and
    `last_hash` say where a good chain ended, so a later check can resume there."""

    ok: bool
    entries: int
    first_bad_line: int | None
    reason: str
    first_audit_id: int | None = None
    last_audit_id: int | None = None
    verified_bytes: int = 0
    last_hash: str = GENESIS_HASH


@attrs.frozen
class _Tail:
    size: int  # bytes to keep (everything up to and including the last newline)
    last_line: bytes | None


def _read_tail(fd: int) -> _Tail:
    """Find the last complete line by reading backwards from the end."""
    end = os.fstat(fd).st_size
    pos = end
    buffer = b""
    last_newline: int | None = None  # absolute offset of the final newline
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        buffer = os.pread(fd, step, pos) + buffer
        if last_newline is None:
            idx = buffer.rfind(b"\n")
            if idx < 0:
                continue
            last_newline = pos + idx
        previous = buffer.rfind(b"\n", 0, last_newline - pos)
        if previous >= 0 or pos == 0:
            start = pos + previous + 1
            line = buffer[start - pos : last_newline - pos]
            return _Tail(last_newline + 1, line)
    return _Tail(0, None)  # no newline at all: the whole file is one torn line


def anchor_path(log_path: Path) -> Path:
    """Where the chain head of the log at ``log_path`` is anchored: ``<log>.head``."""
    return log_path.with_name(log_path.name + ANCHOR_SUFFIX)


@attrs.frozen
class Anchor:
    """The chain head as last made durable: the audit_id and hash of the log's last entry."""

    audit_id: int
    hash: str

    @classmethod
    def read(cls, path: Path) -> Anchor | None:
        """The anchor at ``path``, None when there is none; StateError when unreadable."""
        try:
            data = json.loads(path.read_bytes())
            audit_id, digest = data["audit_id"], data["hash"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise StateError(f"audit log anchor {path} is unreadable: {exc}") from exc
        if (
            isinstance(audit_id, bool)
            or not isinstance(audit_id, int)
            or not isinstance(digest, str)
        ):
            raise StateError(f"audit log anchor {path} holds no audit_id and hash")
        return cls(audit_id, digest)

    def write(self, path: Path) -> None:
        durable.atomic_write_bytes(path, canonical_json(attrs.asdict(self)).encode(), mode=0o640)


class AuditLog:
    """Append-only, hash-chained audit log of one node. Use `AuditLog.open`."""

    def __init__(
        self,
        path: Path,
        fd: int,
        node_id: str,
        ids: AuditIdAllocator,
        last_id: int,
        last_hash: str,
        now: Callable[[], str],
    ) -> None:
        self.path = path
        self._now = now
        self.anchor_path = anchor_path(path)
        self._fd = fd
        self._node_id = node_id
        self._ids = ids
        self._last_id = last_id
        self._last_hash = last_hash
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        path: Path,
        node_id: str,
        ids: AuditIdAllocator,
        *,
        now: Callable[[], str] = utc_now_rfc3339,
    ) -> AuditLog:
        """Open (creating it and its parent dirs durably) and learn the last id and hash
        from the tail.

        Raises StateError when the last complete line is not an audit entry, or when the
        log ends before its anchor (entries were removed): appending to a chain whose end
        is unknown, or cut, would hide the damage.
        """
        durable.make_dirs(path.parent)
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            if created:
                durable.fsync_dir(path.parent)
            tail = _read_tail(fd)
            size = os.fstat(fd).st_size
            if tail.size < size:
                _log.warning(
                    "audit log %s: removing a torn last line (%d bytes, interrupted write)",
                    path,
                    size - tail.size,
                )
                os.ftruncate(fd, tail.size)
                durable.fsync(fd)
            last_id, last_hash = 0, GENESIS_HASH
            if tail.last_line is not None:
                last_id, last_hash = _tail_entry(path, tail.last_line)
            _check_against_anchor(path, last_id, last_hash)
        except BaseException:
            os.close(fd)
            raise
        ids.raise_floor(last_id)
        return cls(path, fd, node_id, ids, last_id, last_hash, now)

    @property
    def ids(self) -> AuditIdAllocator:
        """The allocator this log (and the node's observations) take ids from."""
        return self._ids

    @property
    def last_audit_id(self) -> int:
        """The id of the last entry written to this log (0 when empty)."""
        return self._last_id

    def append(
        self, event: str, fields: dict[str, Any], *, audit_id: int | None = None
    ) -> dict[str, Any]:
        """Write one entry, fsync it, anchor it, and return it. Blocking (worker threads).

        ``audit_id`` replays an id reserved earlier (the migration's exactly-once record);
        it must be above the log's last id. Failpoint ``audit.before_append`` fires before
        an id is taken or a byte written.
        """
        clash = RESERVED_FIELDS.intersection(fields)
        if clash:
            raise ValueError(f"audit fields may not set {sorted(clash)}")
        with self._lock:
            failpoints.hit("audit.before_append")
            if audit_id is None:
                audit_id = self._ids.next()
            elif audit_id <= self._last_id:
                raise ValueError(f"audit_id {audit_id} is not above the last one ({self._last_id})")
            else:
                self._ids.raise_floor(audit_id)
            entry: dict[str, Any] = {
                "audit_id": audit_id,
                "timestamp": self._now(),
                "node_id": self._node_id,
                "event": event,
                **fields,
                "prev_hash": self._last_hash,
            }
            entry["hash"] = entry_hash(self._last_hash, entry)
            line = (json.dumps(entry, separators=(",", ":"), allow_nan=False) + "\n").encode()
            _write_all(self._fd, line)
            durable.fsync(self._fd)
            self._last_id = audit_id
            self._last_hash = entry["hash"]
            Anchor(audit_id, entry["hash"]).write(self.anchor_path)
            return entry

    def recent_entries(self, count: int) -> list[dict[str, Any]]:
        """The last `count` entries (fewer in a shorter log), oldest first; blocking."""
        with self._lock:
            end = os.fstat(self._fd).st_size
            start, lines = end, [b""]
            while start > 0 and len(lines) <= count + 1:
                start = max(0, start - _TAIL_CHUNK)
                lines = os.pread(self._fd, end - start, start).split(b"\n")
        return [json.loads(line) for line in lines[-count - 1 :] if line][-count:]

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _check_against_anchor(path: Path, last_id: int, last_hash: str) -> None:
    anchor = Anchor.read(anchor_path(path))
    if anchor is None or last_id > anchor.audit_id:
        return  # no anchor yet, or the last entry's anchor write was cut short
    if last_id < anchor.audit_id:
        raise StateError(
            f"audit log {path} ends at audit_id {last_id} but its anchor "
            f"{anchor_path(path)} names audit_id {anchor.audit_id}: entries were removed; "
            "run `annactl audit verify`"
        )
    if last_hash != anchor.hash:
        raise StateError(
            f"audit log {path}: the last entry's hash differs from its anchor "
            f"{anchor_path(path)}; run `annactl audit verify`"
        )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _tail_entry(path: Path, line: bytes) -> tuple[int, str]:
    try:
        entry = json.loads(line)
        audit_id, digest = entry["audit_id"], entry["hash"]
    except (ValueError, TypeError, KeyError) as exc:
        raise StateError(
            f"audit log {path}: the last line is not an audit entry; run `annactl audit verify`"
        ) from exc
    if isinstance(audit_id, bool) or not isinstance(audit_id, int) or not isinstance(digest, str):
        raise StateError(f"audit log {path}: the last line has no valid audit_id/hash")
    return audit_id, digest


def _lines(path: Path, offset: int) -> Iterator[bytes]:
    with path.open("rb") as file:
        file.seek(offset)
        yield from file


_REQUIRED = ("audit_id", "timestamp", "node_id", "event", "prev_hash", "hash")


def verify_audit_log(
    path: Path,
    anchor_file: Path | None = None,
    *,
    resume: AuditVerification | None = None,
) -> AuditVerification:
    """Check the whole chain and that audit_id strictly increases, streaming the file,
    then that the log reaches its anchor (``<log>.head`` unless ``anchor_file`` is given):
    a log cut short of it was truncated, which the chain alone cannot show.

    `resume`, an earlier good verification of this same file, checks only what was
    appended since (the operator console re-checks a growing log this way); the caller
    knows the file was only appended to. An anchor inside the part checked before is
    taken as met. Raises OSError when a file cannot be read, StateError when the anchor
    is not one.
    """
    anchor = Anchor.read(anchor_file or anchor_path(path))
    start = resume if resume is not None and resume.ok else AuditVerification(True, 0, None, "")
    prev_hash = start.last_hash
    prev_id = start.last_audit_id
    first_id = start.first_audit_id
    entries = start.entries
    offset = start.verified_bytes
    anchored_line: int | None = None  # the line holding the anchored audit_id
    anchored_hash = ""
    if anchor is not None and prev_id is not None and anchor.audit_id <= prev_id:
        anchored_line = entries  # checked before; its hash was the resumed chain's then
        anchored_hash = anchor.hash if anchor.audit_id < prev_id else prev_hash

    def bad(line_no: int, reason: str) -> AuditVerification:
        return AuditVerification(False, entries, line_no, reason, first_id, prev_id)

    for line_no, raw in enumerate(_lines(path, offset), start=entries + 1):
        if not raw.endswith(b"\n"):
            return bad(line_no, "incomplete last line (torn write; annad removes it at start)")
        try:
            entry = json.loads(raw)
        except ValueError:
            return bad(line_no, "not valid JSON")
        if not isinstance(entry, dict):
            return bad(line_no, "not a JSON object")
        missing = [key for key in _REQUIRED if key not in entry]
        if missing:
            return bad(line_no, f"missing {', '.join(missing)}")
        audit_id = entry["audit_id"]
        if isinstance(audit_id, bool) or not isinstance(audit_id, int) or audit_id < 1:
            return bad(line_no, "audit_id is not a positive integer")
        if entry["prev_hash"] != prev_hash:
            return bad(line_no, "prev_hash does not match the previous entry's hash")
        body = {key: value for key, value in entry.items() if key != "hash"}
        if entry["hash"] != entry_hash(prev_hash, body):
            return bad(line_no, "hash does not match the entry's content")
        if prev_id is not None and audit_id <= prev_id:
            return bad(line_no, f"audit_id {audit_id} is not above the previous {prev_id}")
        if anchor is not None and audit_id == anchor.audit_id and anchored_line is None:
            anchored_line = line_no
            anchored_hash = entry["hash"]
        prev_hash = entry["hash"]
        prev_id = audit_id
        first_id = audit_id if first_id is None else first_id
        entries += 1
        offset += len(raw)
    if anchor is None:
        reason = "chain verified (no anchor file: truncation not checked)"
    elif anchored_line is None and (prev_id or 0) > anchor.audit_id:
        return bad(
            entries,
            f"its anchor names audit_id {anchor.audit_id}, which is not in the log",
        )
    elif anchored_line is None:
        return bad(
            entries + 1,
            f"the log ends at audit_id {prev_id or 0} but its anchor expects an entry with "
            f"audit_id {anchor.audit_id} (hash {anchor.hash[:16]}…): entries were removed "
            "from the end",
        )
    elif anchored_hash != anchor.hash:
        return bad(anchored_line, "hash differs from the one its anchor recorded")
    else:
        reason = f"chain verified through its anchor (audit_id {anchor.audit_id})"
    return AuditVerification(True, entries, None, reason, first_id, prev_id, offset, prev_hash)
