"""The node service with a real store and audit log, one validator, on the autojump clock."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from anna_trio import crypto
from anna_trio._exceptions import NodeHalted
from anna_trio.audit import AuditIdAllocator, AuditLog
from anna_trio.metrics import Metrics
from anna_trio.models import ClusterConfig, Observation, PeerConfig, SyntheticObserver
from anna_trio.node import SYNC_ANSWER_ITEMS, Node, SubmitOutcome
from anna_trio.observer import ConfiguredObserver
from anna_trio.outbox import PeerOutbox
from anna_trio.rpc.server import ROUND_ANSWER_CACHE, RpcServer
from anna_trio.rpc.views import round_json, status_json
from anna_trio.seams import Clock, Outbox
from anna_trio.state.migration import migrate_state
from anna_trio.state.statefile import StateFile
from anna_trio.store import Store
from anna_trio.transport.server import Request, json_response
from anna_trio.wire import Batch, SyncAnswer, parse_batch, parse_sync_request
from inline_store import InlineStore
from strategies import node_pubkey_hex, signed_observation

RETAIN = 5


def observations_of(*observations: Observation) -> Batch:
    return Batch(observations=tuple(obs.to_dict() for obs in observations))


async def run_inline(work: Callable[[], object]) -> object:
    """Blocking file work on the Trio thread: the autojump clock sees it finish."""
    return work()


class FakeClock:
    """A wall clock the test sets (`now`)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def wall(self) -> float:
        return self.now


def make_node(
    directory: Path,
    *others: str,
    store_type: type[InlineStore] = InlineStore,
    state_file: StateFile | None = None,
    outbox: Outbox | None = None,
    clock: Clock | None = None,
) -> Node:
    """node_001 with its own key; `others` are validators with the test keys of strategies."""
    key = crypto.load_or_create_key(directory / "keys")
    config = ClusterConfig(
        peers=(
            PeerConfig("node_001", "127.0.0.1", 8001, crypto.public_key_hex(key)),
            *(
                PeerConfig(n, "127.0.0.1", 8001 + i, node_pubkey_hex(n))
                for i, n in enumerate(others, 1)
            ),
        ),
        allow_insecure_peers=True,
    )
    ids = AuditIdAllocator()
    return Node(
        node_id="node_001",
        key=key,
        config=config,
        round_timeout=1.0,
        store=store_type(directory / "node.db"),
        audit=AuditLog.open(directory / "audit.jsonl", "node_001", ids),
        ids=ids,
        metrics=Metrics("node_001"),
        observer=ConfiguredObserver(SyntheticObserver(), "node_001"),
        outbox=outbox or PeerOutbox(others),
        state_file=state_file,
        retain_rounds=RETAIN,
        run_blocking=run_inline,
        clock=clock,
    )


@asynccontextmanager
async def started(directory: Path, *others: str, clock: Clock | None = None) -> AsyncIterator[Node]:
    """make_node, restored from `directory` and running (store writer and node tasks)
    until the block ends; then stopped and its store closed, as a restart would."""
    node = make_node(directory, *others, clock=clock)
    node.restore()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.store.run)
        await nursery.start(node.run)
        yield node
        nursery.cancel_scope.cancel()
    node.store.close()


@pytest.fixture
async def running(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> AsyncIterator[Node]:
    async with started(tmp_path) as node:
        yield node


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
    assert len(running.own._signed) <= RETAIN
    assert len(running.own._begun) <= RETAIN


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


async def test_a_pruned_round_opened_again_reuses_the_signed_observation(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A Pending round keeps older ids retainable, so a Complete round the engine pruned
    can be opened again (late gossip): the node re-sends what it signed, never a second,
    different observation (which would be evidence against itself)."""
    node = make_node(tmp_path, "node_002")
    node.restore()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.store.run)
        await nursery.start(node.run)
        assert await node.start_round("b_pending", 24) == "b_pending"  # node_002 never answers
        signed = {}
        for i in range(RETAIN + 2):
            round_id = f"c{i}"
            assert await node.start_round(round_id, 24) == round_id
            await node.ingest(observations_of(signed_observation("node_002", round_id)))
            view = node.engine.round(round_id)
            assert view is not None and view.status == "Complete"
            [signed[round_id]] = [o for o in view.observations if o.node_id == "node_001"]
        assert node.engine.round("c0") is None, "c0 should have been pruned"
        assert await node.start_round("c0", 24) == "c0"
        await trio.sleep(0.1)
        view = node.engine.round("c0")
        assert view is not None
        [again] = [o for o in view.observations if o.node_id == "node_001"]
        assert again == signed["c0"]
        nursery.cancel_scope.cancel()
    node.store.close()


def test_load_says_which_own_rows_it_left_on_disk(tmp_path: Path) -> None:
    """Start-up loads own rows of the retained rounds only and names the newest it left,
    so signing asks the store for older rounds alone."""
    store = InlineStore(tmp_path / "node.db")
    rounds = [f"r{i}" for i in range(6)]
    store.write_now(
        [InlineStore.round_stmt(r, 24, 0.0) for r in rounds]
        + [InlineStore.own_stmt(signed_observation("node_001", r)) for r in rounds[:4]]
    )
    data = store.load(keep_rounds=3)
    assert sorted(data.own) == ["r3"]
    assert data.own_not_loaded_through == "r2"
    assert store.load(keep_rounds=10).own_not_loaded_through == ""
    store.close()


async def test_status_answers_follow_the_round_and_are_encoded_once_per_change(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """GET /rpc/status?round_id= answers exactly the round's current JSON: re-encoded
    when an observation arrives, the same bytes while nothing changed; bounded."""
    async with started(tmp_path, "node_002", "node_003") as node:
        server = RpcServer(node, node.metrics, reconcile=_no_reconcile)

        async def answer(round_id: str) -> bytes:
            request = Request("GET", "/rpc/status", {"round_id": [round_id]}, {}, b"", "127.0.0.1")
            response = await server.handle(request)
            assert response.status == 200
            return response.body

        def fresh(round_id: str) -> bytes:
            view = node.engine.round(round_id)
            assert view is not None
            return json_response(200, round_json(view)).body

        await node.start_round("s0", 24)
        first = await answer("s0")
        assert first == fresh("s0") and await answer("s0") is first
        for peer in ("node_002", "node_003"):
            await node.ingest(observations_of(signed_observation(peer, "s0")))
            changed = await answer("s0")
            assert changed == fresh("s0") and changed != first
            first = changed
        assert json.loads(first)["status"] == "Complete"
        for i in range(ROUND_ANSWER_CACHE + 5):
            await node.start_round(f"t{i:03d}", 24)
            await answer(f"t{i:03d}")
        assert len(server._round_answers) == ROUND_ANSWER_CACHE


def _start_request(key: str, body: bytes = b"") -> Request:
    return Request("POST", "/rpc/round/start", {}, {"idempotency-key": key}, body, "127.0.0.1")


async def _serve_once(
    directory: Path, requests: list[Request]
) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """Start node_001 on `directory`, send `requests` to its RPC server all at once, and
    stop it: their answers, and the rounds the node then knows."""
    answers: list[tuple[int, dict[str, Any]]] = [(0, {})] * len(requests)
    async with started(directory, "node_002", "node_003") as node:
        server = RpcServer(node, node.metrics, reconcile=_no_reconcile)

        async def send(i: int, request: Request) -> None:
            response = await server.handle(request)
            answers[i] = (response.status, json.loads(response.body))

        async with trio.open_nursery() as senders:
            for i, request in enumerate(requests):
                senders.start_soon(send, i, request)
        return answers, node.engine.round_ids()


async def test_a_round_start_key_keeps_its_answer_across_a_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """SPEC §7: a repeated Idempotency-Key gets the original answer. A start without a
    round_id makes up a new id, so a repeat after a restart must not make up another."""
    [(status, first)], rounds = await _serve_once(tmp_path, [_start_request("k1")])
    assert status == 202 and rounds == [first["round_id"]]
    [again, other], rounds = await _serve_once(
        tmp_path, [_start_request("k1"), _start_request("k2", b'{"round_id": "r_other"}')]
    )
    assert again == (202, first)
    assert other == (202, {"success": True, "round_id": "r_other"})
    assert rounds == sorted([first["round_id"], "r_other"])
    [refused], _ = await _serve_once(tmp_path, [_start_request("", b"{}")])
    assert refused[0] == 400 and refused[1]["error"] == "bad_idempotency_key"


async def test_repeats_of_a_key_in_flight_together_start_one_round(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The second request waits for the first instead of opening a round of its own."""
    answers, rounds = await _serve_once(tmp_path, [_start_request("same")] * 3)
    assert len(rounds) == 1
    assert answers == [(202, {"success": True, "round_id": rounds[0]})] * 3


async def _no_reconcile() -> int:
    return 0


# --- durable before it leaves, durable before it is summarised ---------------------------


class GatedStore(InlineStore):
    """A disk whose fsync completes only when the test opens the gate."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = trio.Event()
        self.syncing = trio.Event()

    async def _sync(self) -> None:
        self.syncing.set()
        await self.gate.wait()
        await super()._sync()


class RecordingOutbox:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def broadcast(self, kind: str, item: dict[str, Any], exclude: Any = ()) -> None:
        self.sent.append((kind, item))

    def pull_soon(self) -> None:
        pass


async def test_own_observation_leaves_only_once_its_signature_is_fsynced(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Sign-state before signature (CometBFT's rule): until the fsync covering our signed
    observation returns, it is in no broadcast, no answer, no status and no sync answer,
    and the round start is not answered."""
    outbox = RecordingOutbox()
    node = make_node(tmp_path, "node_002", store_type=GatedStore, outbox=outbox)
    store = node.store
    assert isinstance(store, GatedStore)
    node.restore()
    started: list[str | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(node.run)

        async def start() -> None:
            started.append(await node.start_round("r1", 24))

        nursery.start_soon(start)
        with trio.fail_after(5):
            await store.syncing.wait()
        await trio.sleep(5)  # anything that would leak has had its chance
        assert started == []
        assert [kind for kind, _ in outbox.sent if kind == "observations"] == []
        assert node.engine.observation_of("r1", "node_001") is None
        assert status_json(node, list)["rounds"][0]["total_observations"] == 0
        assert node.sync_answer(parse_sync_request({"summary": {}})).observations == ()
        store.gate.set()
        with trio.fail_after(5):
            while not started:  # noqa: ASYNC110 - the start's own completion
                await trio.sleep(0.01)
        own = node.engine.observation_of("r1", "node_001")
        assert own is not None
        assert ("observations", own.to_dict()) in outbox.sent
        nursery.cancel_scope.cancel()
    store.close()


async def test_state_json_never_claims_more_than_the_database_holds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A round complete in memory reaches state.json only after the rows behind it are
    fsynced: after a power cut state.json would otherwise count rounds the node lost."""
    audit = AuditLog.open(tmp_path / "migration-audit.jsonl", "node_001", AuditIdAllocator())
    migrate_state(tmp_path, node_id="node_001", audit=audit, metrics=None, log=logging.getLogger())
    audit.close()
    node = make_node(tmp_path, "node_002", "node_003", store_type=GatedStore)
    node._state_file = StateFile.load(tmp_path)
    store = node.store
    assert isinstance(store, GatedStore)
    store.gate.set()
    node.restore()

    def rounds_in_state_json() -> int:
        return int(
            json.loads((tmp_path / "state.json").read_bytes())["consensus"]["rounds_completed"]
        )

    async def complete_with_peers(round_id: str) -> None:
        async with trio.open_nursery() as senders:
            senders.start_soon(node.start_round, round_id, 24)
            for peer in ("node_002", "node_003"):
                batch = {"observations": [signed_observation(peer, round_id).to_dict()]}
                senders.start_soon(node.ingest, parse_batch(batch))
            with trio.fail_after(5):
                while node.engine.status_of(round_id) != "Complete":  # noqa: ASYNC110 - engine state
                    await trio.sleep(0.01)
            senders.cancel_scope.deadline = trio.current_time() + 30

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(node.run)
        await complete_with_peers("r1")
        await trio.sleep(2)  # the state writer's interval
        assert rounds_in_state_json() == 1
        store.gate = trio.Event()  # the disk stalls from here on
        nursery.start_soon(complete_with_peers, "r2")
        with trio.fail_after(5):
            while node.engine.status_of("r2") != "Complete":  # noqa: ASYNC110 - engine state
                await trio.sleep(0.01)
        await trio.sleep(5)
        assert rounds_in_state_json() == 1
        store.gate.set()
        await trio.sleep(2)
        assert rounds_in_state_json() == 2
        nursery.cancel_scope.cancel()
    store.close()


async def test_a_duplicate_is_answered_only_once_its_original_is_durable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A submit answered `duplicate: true` acknowledges the observation gossip brought a
    moment ago: the answer waits for that one's fsync (else a power cut loses it)."""
    node = make_node(tmp_path, "node_002", store_type=GatedStore)
    store = node.store
    assert isinstance(store, GatedStore)
    node.restore()
    obs = signed_observation("node_002", "r1").to_dict()
    answered: list[Any] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(node.run)
        nursery.start_soon(
            node.ingest, parse_batch({"observations": [obs]})
        )  # from gossip, not durable yet

        async def submit() -> None:
            answered.append(await node.submit(obs))

        with trio.fail_after(5):
            await store.syncing.wait()
        nursery.start_soon(submit)
        await trio.sleep(5)
        assert answered == []
        store.gate.set()
        with trio.fail_after(5):
            while not answered:  # noqa: ASYNC110 - the submit's own completion
                await trio.sleep(0.01)
        assert answered == [SubmitOutcome.DUPLICATE]
        nursery.cancel_scope.cancel()
    store.close()


async def test_a_sync_answer_is_capped_and_the_rest_comes_on_the_next_pull(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """An asker that lacks everything gets SYNC_ANSWER_ITEMS observations and `more`;
    pulling again with what it got brings the rest, and then `more` is false."""
    others = [f"node_{n:03d}" for n in range(2, 42)]
    async with started(tmp_path, *others) as node:
        rounds = [f"c{i}" for i in range(RETAIN)]
        for round_id in rounds:
            await node.start_round(round_id, 24)
            await node.ingest(observations_of(*(signed_observation(p, round_id) for p in others)))
        held: dict[str, list[str]] = {}
        answers: list[SyncAnswer] = []
        while not answers or answers[-1].more:
            answers.append(node.sync_answer(parse_sync_request({"summary": held})))
            for obs in answers[-1].observations:
                held.setdefault(obs.round_id, []).append(obs.node_id)
        sizes = [len(answer.observations) for answer in answers]
        assert sizes == [SYNC_ANSWER_ITEMS, RETAIN * 41 - SYNC_ANSWER_ITEMS]
        assert sum(map(len, held.values())) == RETAIN * 41


async def test_an_audit_entry_a_crash_cut_off_is_written_at_the_next_start(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A decision committed with its audit intent, the process killed before the entry
    was appended (cluster simulator, seed 207): the next start writes the entry. An
    intent whose entry did reach the log is not written twice; both intents go with
    the next commit."""
    cut_off = {"byzantine_node": "node_002", "reason": "ConflictingObservations", "round_id": "r1"}
    reached = {**cut_off, "byzantine_node": "node_003"}
    async with started(tmp_path, "node_002", "node_003") as node:
        await node.store.commit(
            [
                Store.audit_intent_stmt("byzantine_detected", cut_off),
                Store.audit_intent_stmt("byzantine_detected", reached),
            ]
        )
        await run_inline(partial(node._audit.append, "byzantine_detected", reached))
    async with started(tmp_path, "node_002", "node_003") as node:
        assert await node.start_round("r2", 24) == "r2"
        assert node.store.audit_intents() == []
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    detected = [e["byzantine_node"] for e in entries if e["event"] == "byzantine_detected"]
    assert sorted(detected) == ["node_002", "node_003"]


def conflicting_pair(round_id: str) -> Batch:
    """Two different observations node_002 signed for one round: a Byzantine decision,
    whose audit entry `byzantine_detected` must go with its commit."""
    return observations_of(
        signed_observation("node_002", round_id, 0.8),
        signed_observation("node_002", round_id, 0.2, outcome_tag="other"),
    )


def byzantine_entries(node: Node) -> list[dict[str, Any]]:
    return [e for e in node._audit.recent_entries(50) if e["event"] == "byzantine_detected"]


async def test_a_request_that_times_out_mid_decision_still_writes_its_audit_entry(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The request's deadline passes while the decision's audit entry is being written
    (a slow disk): the shielded step finishes it, so the database never holds a
    Byzantine decision the audit log lacks."""
    async with started(tmp_path, "node_002", "node_003") as node:
        disk_answers = trio.Event()

        async def on_a_slow_disk(work: Callable[[], object]) -> object:
            await disk_answers.wait()
            return work()

        node._run_blocking = on_a_slow_disk
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_set_after, 2, disk_answers)
            with trio.move_on_after(1):  # the request's timeout
                await node.ingest(conflicting_pair("r1"))
        assert [e["byzantine_node"] for e in byzantine_entries(node)] == ["node_002"]


async def _set_after(seconds: float, event: trio.Event) -> None:
    await trio.sleep(seconds)
    event.set()


async def test_a_decision_that_cannot_be_made_durable_ends_the_node(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commit, audit entry and broadcasts go together or the node ends: an audit log
    that cannot be written (a full disk) fails the request and stops the node, and the
    next start writes the entry whose intent was committed."""
    node = make_node(tmp_path, "node_002", "node_003")
    node.restore()

    def full_disk(event: str, fields: dict[str, Any]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node._audit, "append", full_disk)
    with pytest.raises(BaseExceptionGroup) as ended:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.store.run)
            await nursery.start(node.run)
            with pytest.raises(OSError, match="No space left"):
                await node.ingest(conflicting_pair("r1"))
            await trio.sleep(10)
            nursery.cancel_scope.cancel()  # the node went on: the test fails below
    node.store.close()
    assert ended.group_contains(NodeHalted), ended.value
    async with started(tmp_path, "node_002", "node_003") as again:
        assert [e["byzantine_node"] for e in byzantine_entries(again)] == ["node_002"]


async def test_a_request_after_the_node_stopped_fails_with_its_own_error(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request still in flight while the daemon stops, after the node's task ended: it
    neither starts tasks in the node's closed nursery nor hides its own error behind
    that nursery's RuntimeError."""
    node = make_node(tmp_path, "node_002", "node_003")
    node.restore()

    def full_disk(event: str, fields: dict[str, Any]) -> None:
        raise OSError(28, "No space left on device")

    async with trio.open_nursery() as outer:
        await outer.start(node.store.run)
        async with trio.open_nursery() as inner:
            await inner.start(node.run)
            inner.cancel_scope.cancel()
        monkeypatch.setattr(node._audit, "append", full_disk)
        with pytest.raises(OSError, match="No space left"):
            await node.ingest(conflicting_pair("r1"))
        outer.cancel_scope.cancel()
    node.store.close()
