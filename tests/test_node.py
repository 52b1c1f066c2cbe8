"""The node service with a real store and audit log, one validator, on the autojump clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from anna_trio import crypto
from anna_trio.audit import AuditIdAllocator, AuditLog
from anna_trio.config import ObserverConfig
from anna_trio.metrics import Metrics
from anna_trio.models import ClusterConfig, PeerConfig
from anna_trio.node import Node
from anna_trio.observer import Observer
from inline_store import InlineStore

RETAIN = 5


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def make_node(directory: Path) -> Node:
    key = crypto.load_or_create_key(directory / "keys")
    config = ClusterConfig(
        peers=(PeerConfig("node_001", "127.0.0.1", 8001, crypto.public_key_hex(key)),),
        allow_insecure_peers=True,
    )
    ids = AuditIdAllocator()
    return Node(
        node_id="node_001",
        key=key,
        config=config,
        round_timeout=1.0,
        store=InlineStore(directory / "node.db"),
        audit=AuditLog.open(directory / "audit.jsonl", "node_001", ids),
        ids=ids,
        metrics=Metrics("node_001"),
        observer=Observer(ObserverConfig(), "node_001"),
        state_file=None,
        retain_rounds=RETAIN,
    )


@pytest.fixture
async def running(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> AsyncIterator[Node]:
    node = make_node(tmp_path)
    node.restore()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.store.run)
        await nursery.start(node.run)
        yield node
        nursery.cancel_scope.cancel()
    node.store.close()


async def complete(node: Node, round_id: str) -> None:
    assert await node.start_round(round_id, 24) == round_id
    with trio.fail_after(5):
        while (view := node.engine.round(round_id)) is None or view.status != "Complete":  # noqa: ASYNC110 - engine state has no event to wait on
            await trio.sleep(0.01)


async def test_pruned_rounds_release_their_own_observations(
    running: Node, autojump_clock: trio.testing.MockClock
) -> None:
    """Memory stays bounded: rounds the engine prunes leave the node's own-signing maps."""
    for i in range(4 * RETAIN):
        await complete(running, f"r{i:03d}")
    assert len(running.engine.round_ids()) <= RETAIN
    assert len(running._own) <= RETAIN
    assert len(running._own_started) <= RETAIN


async def test_round_older_than_everything_kept_is_refused(
    running: Node, autojump_clock: trio.testing.MockClock
) -> None:
    """A start for a round sorting before every retained round returns None (HTTP 409),
    instead of a 202 for a round that is silently not stored."""
    for i in range(RETAIN + 2):
        await complete(running, f"r{i:03d}")
    assert await running.start_round("a_too_old", 24) is None
    assert running.engine.round("a_too_old") is None


async def test_own_observation_is_signed_once_across_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """After a restart the node re-sends the very observation it signed, never a new one."""
    first = make_node(tmp_path)
    first.restore()
    async with trio.open_nursery() as nursery:
        await nursery.start(first.store.run)
        await nursery.start(first.run)
        await complete(first, "r001")
        signed = first.engine.round("r001")
        nursery.cancel_scope.cancel()
    first.store.close()
    assert signed is not None
    (before,) = signed.observations

    second = make_node(tmp_path)
    second.restore()
    async with trio.open_nursery() as nursery:
        await nursery.start(second.store.run)
        await nursery.start(second.run)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    second.store.close()
    view = second.engine.round("r001")
    assert view is not None
    assert view.observations == (before,)
    assert not second.engine.byzantine  # a second, different signature would be evidence
