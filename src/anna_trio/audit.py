"""The hash-chained audit log (SPEC §4) and the node's audit_id allocator (SPEC §3).

One JSON object per line. Each entry's ``hash`` is
``sha256(prev_hash + canonical JSON of the entry without "hash")`` and the next entry
carries it as ``prev_hash``, so an edited, removed or reordered line breaks the chain at
that line. The first entry's ``prev_hash`` is 64 zeros.

Opening reads only the tail (the log may be gigabytes); a torn last line left by kill -9
mid-write is cut away. Appends are one ``write()`` on an ``O_APPEND`` descriptor, fsynced
when the entry must survive power loss (migration, Byzantine entries).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from . import failpoints
from ._exceptions import StateError

GENESIS_HASH = "0" * 64
RESERVED_FIELDS = frozenset({"audit_id", "timestamp", "node_id", "event", "prev_hash", "hash"})
_TAIL_CHUNK = 64 * 1024

_log = logging.getLogger(__name__)


def canonical_json(value: Any) -> str:
    """The one encoding hashes are computed over: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def entry_hash(prev_hash: str, entry_without_hash: dict[str, Any]) -> str:
    """sha256(prev_hash + canonical JSON of the entry without "hash"), hex."""
    return hashlib.sha256((prev_hash + canonical_json(entry_without_hash)).encode()).hexdigest()


def utc_now_rfc3339() -> str:
    """Now as RFC 3339 UTC with milliseconds and a `Z`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class AuditIdAllocator:
    """This node's strictly increasing audit_id sequence, shared by audit entries and
    signed observations. Thread-safe: the daemon allocates from worker threads too."""

    def __init__(self, floor: int = 0) -> None:
        self._last = floor
        self._lock = threading.Lock()

    def next(self) -> int:
        """The next unused id (floor + 1), never handed out twice."""
        with self._lock:
            self._last += 1
            return self._last

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


class AuditLog:
    """Append-only, hash-chained audit log of one node. Use `AuditLog.open`."""

    def __init__(
        self, path: Path, fd: int, node_id: str, ids: AuditIdAllocator, last_id: int, last_hash: str
    ) -> None:
        self.path = path
        self._fd = fd
        self._node_id = node_id
        self._ids = ids
        self._last_id = last_id
        self._last_hash = last_hash
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, node_id: str, ids: AuditIdAllocator) -> AuditLog:
        """Open (creating parent dirs) and learn the last id and hash from the tail.

        Raises StateError when the last complete line is not an audit entry: appending
        to a chain whose end is unknown would hide the damage.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            tail = _read_tail(fd)
            size = os.fstat(fd).st_size
            if tail.size < size:
                _log.warning(
                    "audit log %s: removing a torn last line (%d bytes, interrupted write)",
                    path,
                    size - tail.size,
                )
                os.ftruncate(fd, tail.size)
                os.fsync(fd)
            last_id, last_hash = 0, GENESIS_HASH
            if tail.last_line is not None:
                last_id, last_hash = _tail_entry(path, tail.last_line)
        except BaseException:
            os.close(fd)
            raise
        ids.raise_floor(last_id)
        return cls(path, fd, node_id, ids, last_id, last_hash)

    @property
    def ids(self) -> AuditIdAllocator:
        """The allocator this log (and the node's observations) take ids from."""
        return self._ids

    @property
    def last_audit_id(self) -> int:
        """The id of the last entry written to this log (0 when empty)."""
        return self._last_id

    def append(
        self,
        event: str,
        fields: dict[str, Any],
        *,
        durable: bool = False,
        audit_id: int | None = None,
    ) -> dict[str, Any]:
        """Write one entry and return it. ``audit_id`` replays an id reserved earlier
        (the migration's exactly-once record); it must be above the log's last id.

        Failpoint ``audit.before_append`` fires before an id is taken or a byte written.
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
                "timestamp": utc_now_rfc3339(),
                "node_id": self._node_id,
                "event": event,
                **fields,
                "prev_hash": self._last_hash,
            }
            entry["hash"] = entry_hash(self._last_hash, entry)
            line = (json.dumps(entry, separators=(",", ":"), allow_nan=False) + "\n").encode()
            _write_all(self._fd, line)
            if durable:
                os.fsync(self._fd)
            self._last_id = audit_id
            self._last_hash = entry["hash"]
            return entry

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


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


def verify_audit_log(path: Path, *, resume: AuditVerification | None = None) -> AuditVerification:
    """Check the whole chain and that audit_id strictly increases, streaming the file.

    `resume`, an earlier good verification of this same file, checks only what was
    appended since (the operator console re-checks a growing log this way); the caller
    knows the file was only appended to. Raises OSError when the file cannot be read.
    """
    start = resume if resume is not None and resume.ok else AuditVerification(True, 0, None, "")
    prev_hash = start.last_hash
    prev_id = start.last_audit_id
    first_id = start.first_audit_id
    entries = start.entries
    offset = start.verified_bytes

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
        prev_hash = entry["hash"]
        prev_id = audit_id
        first_id = audit_id if first_id is None else first_id
        entries += 1
        offset += len(raw)
    return AuditVerification(
        True, entries, None, "chain verified", first_id, prev_id, offset, prev_hash
    )
