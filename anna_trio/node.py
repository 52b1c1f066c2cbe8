"""The node service: owns the engine and the store; the one place consensus state changes.

RPC routes and peer links call in with parsed messages (`anna_trio.wire`); the engine
decides, `effects_of` says what its events mean, and `_apply` carries that out — the
durable part (commit, audit entries, broadcasts) as one step that a request's
cancellation cannot cut, before any answer is given. This node's own observations are
signed and released by `own.OwnObservations`; relay and timer decisions come from
`policy`. What the answers look like is the RPC layer's business (`rpc.views`).
"""

from __future__ import annotations

import collections
import enum
import json
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import crypto, failpoints
from ._exceptions import NodeHalted, ObservationError
from .audit import RESERVED_FIELDS, AuditIdAllocator, AuditLog
from .consensus import COMPLETE, PENDING
from .consensus import events as ev
from .consensus.engine import Engine, EngineConfig, RoundView
from .effects import AuditEntry, Effects, effects_of
from .metrics import Metrics
from .models import ClusterConfig, Observation, parse_evidence, parse_observation
from .own import Claim, OwnObservations
from .policy import (
    RELAY,
    RELAY_LINGER,
    STUCK,
    EarlyPulls,
    RelayHolds,
    Timers,
    clock_round_id,
    direct_fan_out,
    round_admission,
    stuck_check_delay,
)
from .seams import BlockingRunner, Clock, Observer, Outbox, SystemClock
from .state.statefile import StateFile, StateSnapshot
from .store import Statement, Store
from .wire import Batch, IngestCounts, RoundRef, SyncAnswer, SyncRequest

log = logging.getLogger("anna.node")

RETAINED_ROUNDS = 1000
SYNC_ROUNDS = 100
SYNC_ANSWER_ITEMS = 128  # observations + 2 x evidence per sync answer; "more": ask again
AVERAGE_WINDOW = 100
STATE_WRITE_INTERVAL = 1.0
OWN_ANSWER_WAIT = 0.2
RECENT_AUDIT_SLACK = 16  # entries besides the intents' own that may follow them in the log


class SubmitOutcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"  # a second, different observation: the node is now Byzantine
    NOT_A_VALIDATOR = "not_a_validator"  # not in the validator set of that round


class Rejected(Exception):
    """Raised when an observation is refused before the engine sees it; `kind` is its
    metric label: ``invalid``, ``unknown_node`` or ``bad_signature``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@attrs.define
class ReloadStatus:
    result: str = "none"
    at: str | None = None
    error: str | None = None


class Node:
    """One Anna node's consensus state machine wrapped in durable I/O."""

    def __init__(
        self,
        *,
        node_id: str,
        key: Ed25519PrivateKey,
        config: ClusterConfig,
        round_timeout: float,
        store: Store,
        audit: AuditLog,
        ids: AuditIdAllocator,
        metrics: Metrics,
        observer: Observer,
        outbox: Outbox,
        state_file: StateFile | None,
        clock: Clock | None = None,
        run_blocking: BlockingRunner = trio.to_thread.run_sync,
        retain_rounds: int = RETAINED_ROUNDS,
    ) -> None:
        self.node_id = node_id
        self._round_timeout = round_timeout
        self._retain_rounds = retain_rounds
        self.store = store
        self._audit = audit
        self._ids = ids
        self.metrics = metrics
        self._outbox = outbox
        self._state_file = state_file
        self.clock: Clock = clock or SystemClock()
        self._run_blocking = run_blocking
        self.config = config
        self._pubkeys: dict[str, Ed25519PublicKey] = {}
        self.engine = Engine(self._engine_config(config))
        self._apply_config_keys(config)
        self.own = OwnObservations(
            node_id=node_id,
            key=key,
            ids=ids,
            observer=observer,
            clock=self.clock,
            stored=store.own_observation,
            persist=self._persist_own,
        )
        self._relaying: set[str] = set()
        self._relays = RelayHolds()
        self._timers = Timers()
        self._early_pulls = EarlyPulls(round_timeout)
        self._completed_tis: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._rounds_completed = 0
        self._audit_lock = trio.Lock()
        self._audited: list[Statement] = []  # drop these intents: their entries are written
        self._unwritten: list[AuditEntry] = []
        self._state_dirty = trio.Event()
        self._deadline_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.reload_status = ReloadStatus()

    # --- configuration ----------------------------------------------------------------

    def _engine_config(self, config: ClusterConfig) -> EngineConfig:
        return EngineConfig(
            validators=config.validator_ids,
            quorum=config.quorum,
            deviation_threshold=config.byzantine_deviation_threshold,
            window_count=config.byzantine_window_count,
            round_timeout=self._round_timeout,
            retain_rounds=self._retain_rounds,
        )

    def _apply_config_keys(self, config: ClusterConfig) -> None:
        self._pubkeys = {p.node_id: crypto.parse_public_key(p.pubkey) for p in config.peers}
        self.metrics.quorum_size.set(config.quorum)
        self.metrics.validator_count.set(len(config.peers))

    def apply_config(self, config: ClusterConfig) -> None:
        """Swap to a validated config: new validator set and quorum for new rounds."""
        self.config = config
        self.engine.reconfigure(self._engine_config(config))
        self._apply_config_keys(config)
        self.mark_state_dirty()

    # --- start-up -----------------------------------------------------------------------

    def restore(self) -> None:
        """Replay the store into a fresh engine (start-up, before any listener opens)."""
        data = self.store.load(keep_rounds=self._retain_rounds)
        now = trio.current_time()
        for round_id, window in data.rounds:
            self.engine.open_round(round_id, window, now)
        for obs in data.observations:
            if obs.node_id in self._pubkeys:
                self.engine.add_observation(obs, now)
        for evidence in data.evidence:
            self.engine.add_evidence(evidence, now)
        self.own.restore(data.own, data.own_not_loaded_through)
        self._unwritten = self._unwritten_audits()
        if self._state_file is not None:
            self._rounds_completed = int(
                self._state_file.data.get("consensus", {}).get("rounds_completed", 0)
            )
        self._ids.raise_floor(data.max_own_audit_id)
        self.metrics.byzantine_nodes.set(len(self.engine.byzantine))
        for view in self.engine.rounds():
            if view.status == COMPLETE and view.result.consensus_tis is not None:
                self._note_completed(view.round_id, view.result.consensus_tis)
        log.info(
            "restored %d rounds, %d observations, %d evidence records; byzantine: %s",
            len(data.rounds),
            len(data.observations),
            len(data.evidence),
            sorted(self.engine.byzantine) or "none",
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Round deadlines, state.json upkeep and own-observation tasks live here. What
        start-up restored is re-sent at once: it waits in the outbox for the links."""
        for entry in self._unwritten:
            log.warning("writing the audit entry a crash cut off: %s %s", entry.event, entry.fields)
            await self._write_audit(entry)
        self._unwritten = []
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._start_tasks(nursery)
                task_status.started()
                await self._deadline_loop()
        finally:
            self._nursery = None  # closed: requests still in flight start nothing in it

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        """state.json upkeep, the re-send of what was restored, own observations for the
        rounds still Pending."""
        nursery.start_soon(self._state_writer)
        for obs in self.own.restored():
            if self.engine.status_of(obs.round_id) is not None and self.own.begin(obs.round_id):
                nursery.start_soon(self._release_own, obs)
        for view in self.engine.rounds():
            if view.status == PENDING:
                self._schedule_own(view.round_id, view.window_hours)

    async def _deadline_loop(self) -> None:
        while True:
            deadline = self.engine.next_deadline()
            wake = min(deadline if deadline is not None else float("inf"), self._timers.next_at())
            with trio.move_on_at(wake):
                await self._deadline_changed.wait()
            self._deadline_changed = trio.Event()
            now = trio.current_time()
            stuck = False
            for timer in self._timers.pop_due(now):
                if timer.kind == RELAY:
                    self._flush_relays(timer.round_id)
                else:
                    stuck |= self.engine.status_of(timer.round_id) == PENDING
            if self._early_pulls.due(now, stuck=stuck):
                self._outbox.pull_soon()
            events = self.engine.expire(now)
            if events:
                await self._apply_events(events)

    def _add_timer(self, delay: float, kind: str, round_id: str) -> None:
        self._timers.add(trio.current_time(), delay, kind, round_id)
        self._deadline_changed.set()

    def _direct(self) -> bool:
        return direct_fan_out(len(self.config.peers))

    def _flush_relays(self, round_id: str) -> None:
        for obs in self._relays.release(round_id):
            self._outbox.broadcast("observations", obs.to_dict(), exclude=(obs.node_id,))

    # --- inbound: external submit ----------------------------------------------------

    async def submit(
        self,
        data: Any,
        *,
        keep_with: Callable[[SubmitOutcome], Iterable[Statement]] = lambda outcome: (),
    ) -> SubmitOutcome:
        """POST /rpc/submit: verify, decide, make durable, then return the outcome.
        `keep_with` gives rows committed with the observation (an Idempotency-Key's
        answer), so a repeat gets that answer even after a power cut. Raises Rejected."""
        try:
            obs = self._verified(data)
        except Rejected as rejected:
            self.metrics.observations_received.labels(rejected.kind).inc()
            raise
        events = self.engine.add_observation(obs, trio.current_time())
        outcome = _submit_outcome(events)
        await self._apply_events(events, keep_with(outcome))
        return outcome

    def _verified(self, data: Any) -> Observation:
        try:
            obs = parse_observation(data)
        except ObservationError as exc:
            raise Rejected("invalid", str(exc)) from exc
        self._authentic(obs)
        return obs

    def _authentic(self, obs: Observation) -> None:
        """Raises Rejected unless a validator signed `obs`."""
        public_key = self._pubkeys.get(obs.node_id)
        if public_key is None:
            raise Rejected("unknown_node", f"unknown node_id {obs.node_id!r}")
        if not crypto.verify_observation(obs, public_key):
            raise Rejected("bad_signature", "signature does not verify")

    # --- inbound: peers ------------------------------------------------------------------

    async def gossip(self, batch: Batch) -> tuple[IngestCounts, list[Observation]]:
        """POST /rpc/gossip: ingest a peer's batch, and return this node's own
        observations for the rounds it names, for the answer: the sender (the round's
        starter) relays them, about 2(N-1) requests a round instead of N(N-1)."""
        round_ids = batch.round_ids
        with self.own.claim(round_ids, batch.sender, released=self._released) as claim:
            counts = await self.ingest(batch)
            own = await self._own_for(claim, round_ids)
        return counts, own

    def _released(self, round_id: str) -> bool:
        return self.engine.observation_of(round_id, self.node_id) is not None

    async def _own_for(self, claim: Claim, round_ids: list[str]) -> list[Observation]:
        """Our observations for these rounds: released ones, and claimed ones being signed
        now, waited for at most OWN_ANSWER_WAIT (and half the server's request timeout,
        so the wait never turns the answer into a 503). One released later (a slow
        observer, the `observation.before_send` failpoint) is broadcast instead."""
        with trio.move_on_after(min(OWN_ANSWER_WAIT, self.config.limits.request_timeout / 2)):
            await self.own.wait_for(claim, round_ids)
        own = []
        for round_id in dict.fromkeys(round_ids):
            obs = claim.carried.get(round_id) or self.engine.observation_of(round_id, self.node_id)
            if obs is not None:
                own.append(obs)
        return own

    async def ingest(self, batch: Batch) -> IngestCounts:
        """Batched node-to-node traffic (gossip push, gossip answers, anti-entropy answers)."""
        now = trio.current_time()
        events: list[ev.Event] = []
        rejected = batch.malformed_rounds
        for ref in batch.rounds:
            events += self.engine.open_round(ref.round_id, ref.window_hours, now)
        verified = []
        for data in batch.observations:
            try:
                verified.append(self._verified(data))
            except Rejected as refusal:
                rejected += 1
                self.metrics.observations_received.labels(refusal.kind).inc()
        events += self.engine.add_observations(verified, now)
        for item in batch.evidence:
            try:
                pair = parse_evidence(item)
                self._authentic(pair.first)
                self._authentic(pair.second)
            except (ObservationError, Rejected):
                rejected += 1
                continue
            events += self.engine.add_evidence(pair, now)
        kinds = collections.Counter(type(event) for event in events)
        await self._apply_events(events)
        return IngestCounts(kinds[ev.Accepted], kinds[ev.Duplicate], rejected)

    def sync_answer(self, request: SyncRequest) -> SyncAnswer:
        """Anti-entropy: what the asker lacks among our recent rounds and evidence."""
        lacking = [
            e
            for e in self.engine.evidence()
            if (e.node_id, e.round_id) not in request.known_evidence
        ]
        evidence = lacking[: SYNC_ANSWER_ITEMS // 2]
        missing = self.engine.observations_missing_from(
            request.summary, SYNC_ROUNDS, request.fingerprints
        )
        room = SYNC_ANSWER_ITEMS - 2 * len(evidence)
        return SyncAnswer(
            rounds=tuple(
                RoundRef(round_id, window)
                for round_id, window in self.engine.recent_windows(SYNC_ROUNDS)
                if round_id not in request.summary
            ),
            observations=tuple(missing[:room]),
            evidence=tuple(evidence),
            # Capped: the asker pulls again at once for what did not fit.
            more=len(missing) > room or len(lacking) > len(evidence),
        )

    def sync_request(self) -> SyncRequest:
        summary = self.engine.summary(SYNC_ROUNDS)
        return SyncRequest(
            summary={round_id: tuple(nodes) for round_id, nodes in summary.items()},
            known_evidence=frozenset((e.node_id, e.round_id) for e in self.engine.evidence()),
            sender=self.node_id,
            fingerprints=self.engine.fingerprints(SYNC_ROUNDS),
        )

    # --- rounds ----------------------------------------------------------------------------

    async def start_round(
        self,
        round_id: str | None,
        window_hours: int,
        *,
        keep_with: Callable[[str | None], Iterable[Statement]] = lambda started: (),
    ) -> str | None:
        """Start (idempotently) a round here and on every peer; None when it is too old
        to keep. `keep_with` gives rows committed with the round (see `submit`)."""
        if round_id is None:
            round_id = self._fresh_round_id()
        events = self.engine.open_round(round_id, window_hours, trio.current_time())
        if any(isinstance(event, ev.RoundTooOld) for event in events):
            return None
        if any(isinstance(event, ev.RoundOpened) for event in events) and not self._direct():
            self._relaying.add(round_id)
        with self.own.claim([round_id], None, released=self._released) as claim:
            await self._apply_events(events, keep_with(round_id))
            own = await self._own_for(claim, [round_id])
        self._outbox.broadcast("rounds", {"round_id": round_id, "window_hours": window_hours})
        for obs in own:
            self._outbox.broadcast("observations", obs.to_dict())
        return round_id

    def admission(self, limit: int) -> float | None:
        """None when this node can take a new round now; else the seconds to Retry-After
        (`limit`: rounds short of a quorum it may hold, `limits.pending_rounds`)."""
        return round_admission(
            *self.engine.short_of_quorum(),
            trio.current_time(),
            round_timeout=self._round_timeout,
            limit=limit,
        )

    def _fresh_round_id(self) -> str:
        candidate = clock_round_id(self.clock.wall())
        ids = self.engine.round_ids()
        if ids and candidate <= ids[-1]:
            candidate = ids[-1][:60] + ".1"
        return candidate

    def _schedule_own(self, round_id: str, window_hours: int) -> None:
        if self._nursery is not None and self.own.begin(round_id):
            self._nursery.start_soon(self._sign_and_release, round_id, window_hours)

    async def _sign_and_release(self, round_id: str, window_hours: int) -> None:
        obs = await self.own.sign_once(round_id, window_hours)
        if obs is None:
            self.metrics.observer_failures.inc()
            self.own.abandon(round_id)
            return
        await self._release_own(obs)

    async def _persist_own(self, obs: Observation) -> None:
        """The signed observation and its own-row, durable before anything else sees it."""
        digest = crypto.observation_digest(obs)
        with trio.CancelScope(shield=True):  # a signature made is kept, whoever gave up
            await self.store.commit([Store.own_stmt(obs), Store.observation_stmt(obs, digest)])

    async def _release_own(self, obs: Observation) -> None:
        """Send it one way: carried back to a round's starter in the answer that claimed
        it (which relays it), or to every peer."""
        await failpoints.hit_async("observation.before_send")
        claim = self.own.release_to(obs.round_id)
        if claim is not None:
            claim.carry(obs)
            if claim.asker is not None and self._direct():
                self._outbox.broadcast("observations", obs.to_dict(), exclude=(claim.asker,))
        else:
            self._outbox.broadcast("observations", obs.to_dict())
        await self._apply_events(self.engine.add_observation(obs, trio.current_time()))

    # --- events → effects, applied in one place ----------------------------------------

    async def _apply_events(self, events: list[ev.Event], keep: Iterable[Statement] = ()) -> None:
        effects = effects_of(
            events,
            node_id=self.node_id,
            relaying=self._relaying,
            learned_at=self.clock.wall(),
            status_of=self.engine.status_of,
        )
        effects.statements.extend(keep)
        await self._apply(effects)

    async def _apply(self, effects: Effects) -> None:
        """Bookkeeping first (it never waits), then the durable step — commit, audit
        entries, broadcasts — shielded, so a request's timeout cannot leave a decision in
        the database without its audit entry; an error there ends the node (`_halt`).
        Even an answer with nothing new waits for the durability of what it acknowledges
        (a duplicate of an observation gossip brought a moment ago)."""
        for round_id in effects.forget:
            self.own.forget(round_id)
            self._relaying.discard(round_id)
            self._relays.release(round_id)
        for round_id, window in effects.sign:
            self._schedule_own(round_id, window)
        for round_id in effects.watch:
            self._add_timer(stuck_check_delay(self._round_timeout), STUCK, round_id)
        for obs in effects.relay:
            if self._relays.hold(obs):
                self._add_timer(RELAY_LINGER, RELAY, obs.round_id)
        with trio.CancelScope(shield=True):
            try:
                written, self._audited = self._audited, []
                await self.store.commit(
                    [
                        *written,
                        *effects.statements,
                        *(Store.audit_intent_stmt(e.event, e.fields) for e in effects.audits),
                    ]
                )
                for entry in effects.audits:
                    await self._write_audit(entry)
                for message in effects.broadcasts:
                    self._outbox.broadcast(message.kind, message.item, exclude=message.exclude)
            except Exception as exc:
                self._halt(exc)
                raise
        for round_id in effects.release_relays:
            self._flush_relays(round_id)
        self._count(effects)
        if effects.state_dirty:
            self.mark_state_dirty()
        self._deadline_changed.set()

    def _halt(self, exc: Exception) -> None:
        """End the node (and the daemon: exit 1, systemd restarts it) once a decision
        could not be carried out whole; the next start writes the audit entries whose
        intents were committed (`_unwritten_audits`). The caller gets `exc` as well."""
        log.critical("a decision could not be made durable: stopping the node (%r)", exc)
        if self._nursery is not None:
            self._nursery.start_soon(_halted, exc)

    async def _write_audit(self, entry: AuditEntry) -> None:
        """Append the entry, and let the next commit drop its intent."""
        async with self._audit_lock:
            await self._run_blocking(partial(self._audit.append, entry.event, entry.fields))
        self._audited.append(Store.audit_done_stmt(entry.event, entry.fields))

    def _unwritten_audits(self) -> list[AuditEntry]:
        """The committed decisions' audit entries the log lacks: the process died
        between a commit and its appends (found by the cluster simulator, seed 207).
        Each intent's entry, if written, is among the log's last few: the commit after
        its append drops the intent."""
        intents = self.store.audit_intents()
        if not intents:
            return []
        recent = self._audit.recent_entries(len(intents) + RECENT_AUDIT_SLACK)
        logged = {
            (
                e["event"],
                json.dumps(
                    {k: v for k, v in e.items() if k not in RESERVED_FIELDS}, sort_keys=True
                ),
            )
            for e in recent
        }
        unwritten = []
        for event, fields in intents:
            if (event, json.dumps(fields, sort_keys=True)) in logged:
                self._audited.append(Store.audit_done_stmt(event, fields))
            else:
                unwritten.append(AuditEntry(event, fields))
        return unwritten

    def _count(self, effects: Effects) -> None:
        metrics = self.metrics
        for result, count in effects.observation_results.items():
            metrics.observations_received.labels(result).inc(count)
        for duration in effects.completed_durations:
            metrics.consensus_rounds.inc()
            metrics.round_duration.observe(duration)
            self._rounds_completed += 1
        if effects.rounds_failed:
            metrics.rounds_failed.inc(effects.rounds_failed)
        if effects.byzantine_changed:
            metrics.byzantine_nodes.set(len(self.engine.byzantine))
        for round_id, tis in effects.completed_tis:
            self._note_completed(round_id, tis)
        for line in effects.logs:
            (log.warning if line.warning else log.info)(line.message, *line.args)

    def _note_completed(self, round_id: str, tis: float) -> None:
        self._completed_tis[round_id] = tis
        self._completed_tis.move_to_end(round_id)
        while len(self._completed_tis) > AVERAGE_WINDOW:
            self._completed_tis.popitem(last=False)
        self.metrics.average_tis.set(sum(self._completed_tis.values()) / len(self._completed_tis))

    def record_reload(self, result: str, at: str, error: str | None) -> None:
        """The outcome of the last peers.yml reload, for status, the console and state.json."""
        self.reload_status = ReloadStatus(result, at, error)
        if result == "success":
            self.mark_state_dirty()

    # --- state.json upkeep ------------------------------------------------------------------

    def mark_state_dirty(self) -> None:
        self._state_dirty.set()

    async def _state_writer(self) -> None:
        """Coalesces state.json rewrites: one at a time, at most every STATE_WRITE_INTERVAL.

        Each rewrite costs two fsyncs; under load a round completes every few ms, so
        state.json follows the latest data within a second instead of per round (at 15
        nodes the rewrites were a tenth of all daemon CPU at a quarter second).
        Shutdown writes it once more (persist_state).
        """
        if self._state_file is None:
            return
        while True:
            await self._state_dirty.wait()
            self._state_dirty = trio.Event()
            await self.persist_state()
            await trio.sleep(STATE_WRITE_INTERVAL)

    async def persist_state(self) -> None:
        """Write state.json from what the engine holds now, once the store holds it
        durably: after a power cut state.json never claims more than the database."""
        if self._state_file is None:
            return
        snapshot = self._state_snapshot()  # its rows were queued when the engine changed
        await self.store.flush()
        await self._run_blocking(partial(self._state_file.update, snapshot.update_into))

    def _state_snapshot(self) -> StateSnapshot:
        last = self.last_completed()
        return StateSnapshot(
            validator_count=len(self.config.peers),
            rounds_completed=self._rounds_completed,
            last_round_id=last.round_id if last else None,
            last_round_at=self.wall_time(last.completed_at)
            if last and last.completed_at is not None
            else None,
            byzantine_nodes=sorted(self.engine.byzantine),
            peer_count=len(self.config.peers) - 1,
            last_peer_reload=self.reload_status.at,
            tls_enabled=self.config.tls.enabled,
        )

    # --- read-only views for the RPC status and the console ------------------------------

    def last_completed(self) -> RoundView | None:
        """The Complete round with the highest id, without a view of every retained round."""
        for round_id in reversed(self.engine.round_ids()):
            if self.engine.status_of(round_id) == COMPLETE:
                return self.engine.round(round_id)
        return None

    def recent_rounds(self, limit: int) -> list[RoundView]:
        """Views of the `limit` most recent rounds only (the engine retains up to 1000)."""
        views = (self.engine.round(round_id) for round_id in self.engine.round_ids()[-limit:])
        return [view for view in views if view is not None]

    def wall_time(self, trio_time: float) -> str:
        """An instant of Trio's clock as RFC 3339 UTC on the wall clock."""
        wall = self.clock.wall() - (trio.current_time() - trio_time)
        return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _halted(cause: Exception) -> None:
    raise NodeHalted(f"a decision could not be made durable: {cause}") from cause


def _submit_outcome(events: Iterable[ev.Event]) -> SubmitOutcome:
    for event in events:
        if isinstance(event, ev.Duplicate):
            return SubmitOutcome.DUPLICATE
        if isinstance(event, ev.ConflictDetected):
            return SubmitOutcome.CONFLICT
        if isinstance(event, ev.NotAValidator):
            return SubmitOutcome.NOT_A_VALIDATOR
    return SubmitOutcome.ACCEPTED
