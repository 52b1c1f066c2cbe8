"""The hash-chained audit log (SPEC §4) and the audit_id allocator (SPEC §3)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anna_trio import failpoints
from anna_trio._exceptions import FailpointError, StateError
from anna_trio.audit import (
    GENESIS_HASH,
    RESERVATION_BLOCK,
    Anchor,
    AuditIdAllocator,
    AuditLog,
    IdReservation,
    anchor_path,
    canonical_json,
    verify_audit_log,
)


def write_entries(path: Path, count: int, floor: int = 0) -> list[dict[str, Any]]:
    log = AuditLog.open(path, "node_001", AuditIdAllocator(floor))
    try:
        return [log.append("daemon_start", {"n": n}) for n in range(count)]
    finally:
        log.close()


def test_allocator_is_strictly_increasing_and_never_goes_back() -> None:
    """next() is floor+1 onwards; raise_floor only ever moves the floor up."""
    ids = AuditIdAllocator(41)
    assert ids.next() == 42
    ids.raise_floor(10)
    assert ids.next() == 43
    ids.raise_floor(100)
    assert ids.last == 100
    assert ids.next() == 101


def test_entry_hash_is_sha256_of_prev_hash_and_canonical_json(tmp_path: Path) -> None:
    """hash = sha256(prev_hash + canonical JSON without "hash"); first prev_hash is 64 zeros."""
    first, second = write_entries(tmp_path / "audit.jsonl", 2)
    assert first["prev_hash"] == GENESIS_HASH
    body = {k: v for k, v in first.items() if k != "hash"}
    expected = hashlib.sha256(
        (GENESIS_HASH + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()
    ).hexdigest()
    assert first["hash"] == expected
    assert second["prev_hash"] == first["hash"]
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_entry_fields_and_one_line_per_entry(tmp_path: Path) -> None:
    """Each line is a JSON object with audit_id, timestamp (RFC 3339 Z), node_id, event, fields."""
    path = tmp_path / "logs" / "audit.jsonl"
    write_entries(path, 3, floor=7)
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    entry = json.loads(lines[0])
    assert entry["audit_id"] == 8
    assert entry["node_id"] == "node_001"
    assert entry["event"] == "daemon_start"
    assert entry["n"] == 0
    assert entry["timestamp"].endswith("Z") and entry["timestamp"][10] == "T"


def test_reopen_continues_ids_and_chain(tmp_path: Path) -> None:
    """A reopened log raises the allocator to its last id and continues the chain."""
    path = tmp_path / "audit.jsonl"
    write_entries(path, 3, floor=5)
    ids = AuditIdAllocator()
    log = AuditLog.open(path, "node_001", ids)
    assert log.last_audit_id == 8 and ids.last == 8
    assert log.append("daemon_stop", {})["audit_id"] == 9
    log.close()
    assert verify_audit_log(path).ok


def test_open_reads_only_the_tail(tmp_path: Path) -> None:
    """Open learns the last id from the last line without parsing earlier (here garbage) lines."""
    valid = tmp_path / "valid.jsonl"
    write_entries(valid, 1, floor=99)
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"not json\n" * 20000 + valid.read_bytes())
    log = AuditLog.open(path, "node_001", AuditIdAllocator())
    assert log.last_audit_id == 100
    log.close()


def test_recent_entries_are_the_last_ones_oldest_first(tmp_path: Path) -> None:
    """recent_entries(n): the last n entries, across read-back chunks; all of a short log."""
    path = tmp_path / "audit.jsonl"
    written = write_entries(path, 3)
    log = AuditLog.open(path, "node_001", AuditIdAllocator())
    try:
        written += [log.append("daemon_start", {"pad": "x" * 30_000}) for _ in range(5)]
        assert log.recent_entries(4) == written[-4:]
        assert log.recent_entries(50) == written
        assert log.recent_entries(0) == []
    finally:
        log.close()


def test_tail_read_handles_lines_longer_than_one_chunk(tmp_path: Path) -> None:
    """A last entry bigger than the 64 KiB read-back chunk is still found whole."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog.open(path, "node_001", AuditIdAllocator())
    log.append("small", {})
    log.append("big", {"blob": "x" * 200_000})
    log.close()
    log = AuditLog.open(path, "node_001", AuditIdAllocator())
    assert log.last_audit_id == 2
    log.append("after", {})
    log.close()
    assert verify_audit_log(path).entries == 3


def test_torn_last_line_is_removed_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 mid-write leaves a partial line: open cuts it and the chain stays valid."""
    path = tmp_path / "audit.jsonl"
    write_entries(path, 2)
    good = path.read_bytes()
    with path.open("ab") as file:
        file.write(b'{"audit_id":3,"timest')
    assert verify_audit_log(path).first_bad_line == 3
    with caplog.at_level(logging.WARNING, logger="anna_trio.audit"):
        log = AuditLog.open(path, "node_001", AuditIdAllocator())
    assert "torn last line" in caplog.text
    assert path.read_bytes() == good
    log.append("daemon_start", {})
    log.close()
    assert verify_audit_log(path).entries == 3


def test_file_that_is_only_a_torn_line_becomes_empty(tmp_path: Path) -> None:
    """A first write torn before its newline leaves nothing behind after open."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"audit_id":1')
    log = AuditLog.open(path, "node_001", AuditIdAllocator())
    assert log.last_audit_id == 0
    log.close()
    assert path.read_bytes() == b""


def test_garbage_last_line_refuses_to_append(tmp_path: Path) -> None:
    """An unknown chain end is StateError rather than a silently broken chain."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"garbage\n")
    with pytest.raises(StateError, match="annactl audit verify"):
        AuditLog.open(path, "node_001", AuditIdAllocator())


def test_explicit_audit_id_must_be_above_the_last(tmp_path: Path) -> None:
    """append(audit_id=N) replays a reserved id only when N is above the log's last id."""
    ids = AuditIdAllocator()
    log = AuditLog.open(tmp_path / "audit.jsonl", "node_001", ids)
    log.append("a", {})
    with pytest.raises(ValueError, match="not above"):
        log.append("b", {}, audit_id=1)
    assert log.append("b", {}, audit_id=10)["audit_id"] == 10
    assert ids.next() == 11
    log.close()


def test_reserved_fields_cannot_be_overridden(tmp_path: Path) -> None:
    """Event fields may not replace audit_id, hash and the other envelope fields."""
    log = AuditLog.open(tmp_path / "audit.jsonl", "node_001", AuditIdAllocator())
    with pytest.raises(ValueError, match="audit_id"):
        log.append("x", {"audit_id": 5})
    log.close()


def test_ids_shared_with_observations_leave_gaps_that_verify(tmp_path: Path) -> None:
    """Ids taken by observations leave gaps; the log still verifies (increasing, not dense)."""
    ids = AuditIdAllocator()
    log = AuditLog.open(tmp_path / "audit.jsonl", "node_001", ids)
    log.append("a", {})
    ids.next()  # an observation
    assert log.append("b", {})["audit_id"] == 3
    log.close()
    result = verify_audit_log(tmp_path / "audit.jsonl")
    assert (result.ok, result.entries, result.first_audit_id, result.last_audit_id) == (
        True,
        2,
        1,
        3,
    )


def test_empty_log_verifies(tmp_path: Path) -> None:
    """An empty log is a valid (empty) chain."""
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    assert verify_audit_log(path).ok and verify_audit_log(path).entries == 0


@settings(max_examples=40, deadline=None)
@given(count=st.integers(2, 8), data=st.data())
def test_edit_remove_reorder_name_the_first_bad_line(
    tmp_path_factory: pytest.TempPathFactory, count: int, data: st.DataObject
) -> None:
    """Any edited, removed or swapped line is caught, at the right 1-based line number."""
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    write_entries(path, count)
    lines = path.read_bytes().splitlines(keepends=True)
    kind = data.draw(st.sampled_from(["edit", "remove", "reorder", "edit_rehash", "id"]))
    index = data.draw(st.integers(0, count - 2))  # 0-based; leaves a line after it
    if kind == "edit":
        entry = json.loads(lines[index])
        entry["n"] = 1000
        lines[index] = (json.dumps(entry) + "\n").encode()
        expected = index + 1
    elif kind == "edit_rehash":
        entry = json.loads(lines[index])
        entry["n"] = 1000
        body = {k: v for k, v in entry.items() if k != "hash"}
        entry["hash"] = hashlib.sha256(
            (entry["prev_hash"] + canonical_json(body)).encode()
        ).hexdigest()
        lines[index] = (json.dumps(entry) + "\n").encode()
        expected = index + 2  # the forged line is self-consistent; the next one no longer chains
    elif kind == "remove":
        del lines[index]
        expected = index + 1
    elif kind == "reorder":
        lines[index], lines[index + 1] = lines[index + 1], lines[index]
        expected = index + 1
    else:
        entry = json.loads(lines[index + 1])
        entry["audit_id"] = 1
        lines[index + 1] = (json.dumps(entry) + "\n").encode()
        expected = index + 2
    path.write_bytes(b"".join(lines))
    result = verify_audit_log(path)
    assert not result.ok
    assert result.first_bad_line == expected
    assert result.entries == expected - 1


@settings(max_examples=30, deadline=None)
@given(first=st.integers(0, 5), appended=st.integers(0, 5), bad=st.booleans())
def test_resumed_verification_equals_a_full_one(
    tmp_path_factory: pytest.TempPathFactory, first: int, appended: int, bad: bool
) -> None:
    """Resuming from an earlier good check reads only the appended lines and finds what
    a full check finds: the same counts, ids and end, or the same first bad line."""
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    write_entries(path, first)
    earlier = verify_audit_log(path)
    write_entries(path, appended)
    if bad:
        with path.open("ab") as file:
            file.write(b'{"audit_id": 1}\n')
    resumed = verify_audit_log(path, resume=earlier)
    assert resumed == verify_audit_log(path)
    assert resumed.ok is not bad
    if resumed.ok:
        assert resumed.verified_bytes == path.stat().st_size


def test_resume_reads_past_the_checked_prefix_only(tmp_path: Path) -> None:
    """Lines before the resume point are not read again (damage there is the full
    check's to find: `annactl audit verify`)."""
    path = tmp_path / "audit.jsonl"
    write_entries(path, 3)
    earlier = verify_audit_log(path)
    data = bytearray(path.read_bytes())
    data[data.index(b'"n":1') + 4] = ord("7")  # same length, hash no longer matches
    path.write_bytes(bytes(data))
    write_entries(path, 1)
    assert verify_audit_log(path, resume=earlier).ok
    assert verify_audit_log(path).first_bad_line == 2


def test_verify_rejects_non_increasing_ids_even_with_a_valid_chain(tmp_path: Path) -> None:
    """A correctly hashed entry whose audit_id does not increase is still reported."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog.open(path, "node_001", AuditIdAllocator())
    log.append("a", {})
    log.close()
    log = AuditLog.open(path, "node_001", AuditIdAllocator())
    log._last_id = 0  # simulate a buggy writer reusing an id
    log._ids = AuditIdAllocator(0)
    log.append("b", {})
    log.close()
    result = verify_audit_log(path)
    assert (result.ok, result.first_bad_line) == (False, 2)
    assert "not above" in result.reason


def test_before_append_failpoint_writes_nothing_and_takes_no_id(tmp_path: Path) -> None:
    """An `error` at audit.before_append leaves the log and the allocator untouched."""
    ids = AuditIdAllocator(5)
    log = AuditLog.open(tmp_path / "audit.jsonl", "node_001", ids)
    failpoints.arm("audit.before_append", "error")
    try:
        with pytest.raises(FailpointError):
            log.append("x", {})
    finally:
        failpoints.disarm("audit.before_append")
    assert ids.last == 5 and (tmp_path / "audit.jsonl").read_bytes() == b""
    assert log.append("x", {})["audit_id"] == 6
    log.close()


# --- the chain head's anchor: truncation is visible -----------------------------------


def test_each_entry_moves_the_anchor_beside_the_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    *_, last = write_entries(path, 3)
    assert Anchor.read(anchor_path(path)) == Anchor(last["audit_id"], last["hash"])
    assert anchor_path(path).name == "audit.jsonl.head"


@given(entries=st.integers(1, 6), cut=st.integers(1, 6))
@settings(max_examples=25, deadline=None)
def test_a_log_cut_short_of_its_anchor_fails_verify_naming_the_entry_it_expected(
    tmp_path_factory: pytest.TempPathFactory, entries: int, cut: int
) -> None:
    """Removing the last lines leaves a valid chain; only the anchor shows it."""
    path = tmp_path_factory.mktemp("log") / "audit.jsonl"
    written = write_entries(path, entries, floor=10)
    kept = path.read_text().splitlines(keepends=True)[: max(0, entries - cut)]
    path.write_text("".join(kept))
    result = verify_audit_log(path)
    assert not result.ok
    assert result.first_bad_line == len(kept) + 1
    assert f"audit_id {written[-1]['audit_id']}" in result.reason
    assert "removed from the end" in result.reason
    with pytest.raises(StateError, match="entries were removed"):
        AuditLog.open(path, "node_001", AuditIdAllocator())


def test_verify_without_an_anchor_says_truncation_was_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_entries(path, 2)
    anchor_path(path).unlink()
    result = verify_audit_log(path)
    assert result.ok and "no anchor file" in result.reason
    elsewhere = tmp_path / "copy.head"
    write_entries(tmp_path / "other.jsonl", 3)
    anchor_path(tmp_path / "other.jsonl").rename(elsewhere)
    assert not verify_audit_log(path, elsewhere).ok  # an anchor given explicitly is used


def test_an_anchor_ahead_by_the_entry_being_written_is_not_a_truncation(tmp_path: Path) -> None:
    """A crash between an entry's fsync and its anchor's rename leaves the anchor one
    entry behind the log, never ahead: that log verifies and opens."""
    path = tmp_path / "audit.jsonl"
    first, _ = write_entries(path, 2)
    Anchor(first["audit_id"], first["hash"]).write(anchor_path(path))
    assert verify_audit_log(path).ok
    AuditLog.open(path, "node_001", AuditIdAllocator()).close()


def test_an_edited_last_entry_differs_from_its_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_entries(path, 2)
    Anchor(2, "0" * 64).write(anchor_path(path))
    result = verify_audit_log(path)
    assert (result.ok, result.first_bad_line) == (False, 2)
    with pytest.raises(StateError, match="differs from its anchor"):
        AuditLog.open(path, "node_001", AuditIdAllocator())


# --- audit_ids under a durable reservation ---------------------------------------------


def test_ids_are_handed_out_only_below_the_durable_reservation(tmp_path: Path) -> None:
    reservation = IdReservation(tmp_path / "audit_ids.reserved")
    ids = AuditIdAllocator(41, reservation)
    assert ids.next() == 42
    assert reservation.read() == 41 + RESERVATION_BLOCK
    taken = [ids.next() for _ in range(RESERVATION_BLOCK)]
    assert taken[-1] == 42 + RESERVATION_BLOCK
    assert reservation.read() == 41 + 2 * RESERVATION_BLOCK  # extended once more


def test_after_a_crash_ids_resume_above_everything_reserved(tmp_path: Path) -> None:
    """A crash (no release) may have let any reserved id out: the next process starts
    above the reservation. A clean exit gives the unused ones back: no gap."""
    reservation = IdReservation(tmp_path / "audit_ids.reserved")
    crashed = AuditIdAllocator(0, reservation)
    assert crashed.next() == 1
    assert AuditIdAllocator(0, reservation).next() == RESERVATION_BLOCK + 1
    clean = AuditIdAllocator(0, reservation)
    assert clean.next() == 2 * RESERVATION_BLOCK + 1
    clean.release()
    assert AuditIdAllocator(0, reservation).next() == 2 * RESERVATION_BLOCK + 2


@given(runs=st.lists(st.tuples(st.integers(0, 2500), st.booleans()), min_size=1, max_size=6))
@settings(max_examples=40, deadline=None)
def test_ids_strictly_increase_across_any_mix_of_crashes_and_clean_exits(
    tmp_path_factory: pytest.TempPathFactory, runs: list[tuple[int, bool]]
) -> None:
    reservation = IdReservation(tmp_path_factory.mktemp("ids") / "audit_ids.reserved")
    seen: list[int] = []
    for count, clean in runs:
        ids = AuditIdAllocator(0, reservation)
        seen += [ids.next() for _ in range(count)]
        if clean:
            ids.release()
    assert seen == sorted(set(seen))


async def test_on_the_event_loop_a_reservation_is_written_on_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    reservation = IdReservation(tmp_path / "audit_ids.reserved")
    writers: list[bool] = []
    real_write = reservation.write

    def write(through: int) -> None:
        writers.append(threading.current_thread() is threading.main_thread())
        real_write(through)

    monkeypatch.setattr(reservation, "write", write)
    ids = AuditIdAllocator(0, reservation)
    assert [await ids.next_async() for _ in range(3)] == [1, 2, 3]
    assert writers == [False]


def test_an_unreadable_reservation_refuses_to_guess(tmp_path: Path) -> None:
    path = tmp_path / "audit_ids.reserved"
    path.write_text("12x\n")
    with pytest.raises(StateError, match="not an integer"):
        AuditIdAllocator(0, IdReservation(path))
