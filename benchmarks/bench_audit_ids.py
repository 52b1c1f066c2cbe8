"""What an audit_id costs under the two ways of never reusing one after a power cut.

Every own observation a node signs takes an audit_id, so the id is on each round's
critical path. The two designs the durability issue names:

1. `fsync_before_use`: record each id durably before handing it out (one atomic
   replace of the mark: write, fsync, rename, fsync of the directory) — what
   `IdReservation.write` does, once per id;
2. `blocks`: `AuditIdAllocator` as the daemon runs it, reserving RESERVATION_BLOCK ids
   per durable write (the mark moves a block at a time; a power cut leaves a gap of at
   most one block, never a repeat).

Both allocate through `next_async` on the event loop, the blocking write on a worker
thread, as a node does. Prints one JSON document: per-id wall time for each.

    python benchmarks/bench_audit_ids.py [--ids 2000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from _common import summary_ms

from anna_trio.audit import RESERVATION_BLOCK, AuditIdAllocator, IdReservation


async def fsync_before_use(directory: Path, count: int) -> list[float]:
    """Each id made durable on a worker thread before it is used."""
    mark = IdReservation(directory / "each.reserved")
    took = []
    for n in range(1, count + 1):
        began = time.perf_counter()
        await trio.to_thread.run_sync(mark.write, n)
        took.append(time.perf_counter() - began)
    return took


async def blocks(directory: Path, count: int) -> list[float]:
    """The daemon's allocator: a durable write per RESERVATION_BLOCK ids."""
    allocator = AuditIdAllocator(reservation=IdReservation(directory / "block.reserved"))
    took = []
    for _ in range(count):
        began = time.perf_counter()
        await allocator.next_async()
        took.append(time.perf_counter() - began)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=None, help="filesystem to measure on")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        directory = Path(scratch)
        each = trio.run(fsync_before_use, directory, args.ids)
        block = trio.run(blocks, directory, args.ids)
    result: dict[str, Any] = {
        "ids": args.ids,
        "reservation_block": RESERVATION_BLOCK,
        "fsync_before_use": summary_ms(each),
        "blocks": summary_ms(block),
        "per_id_ratio_mean": round(sum(each) / sum(block), 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
