"""The daemon's heap settling after start-up (daemon.settle_heap)."""

from __future__ import annotations

import gc

from anna_trio.daemon import GC_YOUNG_THRESHOLD, settle_heap


def test_settle_heap_freezes_what_startup_built_and_collects_young_objects_less_often() -> None:
    threshold = gc.get_threshold()
    built_at_startup: list[list[int]] = [[1]]
    assert gc.is_tracked(built_at_startup)
    try:
        settle_heap()
        walked = (obj for generation in range(3) for obj in gc.get_objects(generation))
        assert not any(obj is built_at_startup for obj in walked)
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
