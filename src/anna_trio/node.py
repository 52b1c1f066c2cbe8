"""The node service: owns the engine and the store; the one place consensus state changes.

RPC handlers and peer tasks call in here with decoded JSON; everything a reply
acknowledges is committed to the store first. The engine decides; this shell
verifies signatures, persists, audits, counts and gossips.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

import attrs
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import __version__, crypto, failpoints
from ._exceptions import ObservationError
from .audit import AuditIdAllocator, AuditLog
from .consensus import COMPLETE, PENDING
from .consensus import events as ev
from .consensus.engine import Engine, EngineConfig, RoundView
from .metrics import Metrics
from .models import (
    ClusterConfig,
    Evidence,
    Observation,
    format_utc,
    is_round_id,
    is_window_hours,
    parse_observation,
)
from .observer import Observer
from .state.statefile import StateFile
from .store import Statement, Store

log = logging.getLogger("anna.node")

STATUS_ROUNDS = 100
RETAINED_ROUNDS = 1000
SYNC_ROUNDS = 100
SYNC_ANSWER_ITEMS = 128  # observations + 2 x evidence per sync answer; "more": ask again
AVERAGE_WINDOW = 100
MAX_BATCH_ITEMS = 256
STATE_WRITE_INTERVAL = 1.0
OWN_ANSWER_WAIT = 0.2
STUCK_ROUND_FRACTION = 0.25
RELAY_LINGER = 0.1
DIRECT_FAN_OUT_MAX_VALIDATORS = 3
_STUCK, _RELAY = "stuck", "relay"


class Outbox(Protocol):
    """Where the node hands what its peers must hear (the peer supervisor)."""

    def broadcast(self, kind: str, item: dict[str, Any], exclude: Collection[str] = ()) -> None: ...

    def pull_soon(self) -> None: ...


class _NoPeers:
    def broadcast(self, kind: str, item: dict[str, Any], exclude: Collection[str] = ()) -> None:
        pass

    def pull_soon(self) -> None:
        pass


class _OwnAnswer:
    """Own observations claimed for one message (a gossip answer, a round start's push):
    `_publish_own` hands them here instead of broadcasting them."""

    def __init__(self, asker: str | None) -> None:
        self.asker = asker
        self.carried: dict[str, Observation] = {}
        self.changed = trio.Event()

    def carry(self, obs: Observation) -> None:
        self.carried[obs.round_id] = obs
        self.changed.set()


@attrs.frozen
class Reply:
    """An HTTP answer the RPC layer sends as JSON."""

    status: int
    body: dict[str, Any]
    metric: str | None = None


def error_reply(status: int, code: str, message: str, metric: str | None = None) -> Reply:
    return Reply(status, {"success": False, "error": code, "message": message}, metric)


class _Rejected(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.body.get("message"))
        self.reply = reply


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
        state_file: StateFile | None,
        retain_rounds: int = RETAINED_ROUNDS,
    ) -> None:
        self.node_id = node_id
        self._key = key
        self._round_timeout = round_timeout
        self._retain_rounds = retain_rounds
        self.store = store
        self._audit = audit
        self._ids = ids
        self.metrics = metrics
        self._observer = observer
        self._state_file = state_file
        self.outbox: Outbox = _NoPeers()
        self.config = config
        self._pubkeys: dict[str, Ed25519PublicKey] = {}
        self.engine = Engine(self._engine_config(config))
        self._apply_config_keys(config)
        self._own: dict[str, Observation] = {}
        self._own_started: set[str] = set()
        # Round ids up to this may have a signed own row on disk that `_own` lacks (older
        # than what start-up loaded, or pruned since): only those need the store.
        self._own_on_disk_through = ""
        self._answers: dict[str, _OwnAnswer] = {}
        self._relaying: set[str] = set()
        self._relays: dict[str, list[Observation]] = {}
        self._timers: list[tuple[float, str, str]] = []  # (when, _STUCK or _RELAY, round_id)
        self._quiet_until = 0.0  # no early pull before this (trio time)
        self._completed_tis: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._rounds_completed = 0
        self._audit_lock = trio.Lock()
        self._state_dirty = trio.Event()
        self._deadline_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.reload_status = ReloadStatus()
        self.peer_states: Callable[[], list[dict[str, Any]]] = list

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
        self._own = dict(data.own)
        self._own_on_disk_through = data.own_not_loaded_through
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
        """Round deadlines, state.json upkeep and own-observation tasks live here."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._state_writer)
            for round_id, obs in sorted(self._own.items()):
                if self.engine.status_of(round_id) is not None:
                    self._own_started.add(round_id)
                    nursery.start_soon(self._publish_own, obs)
            for view in self.engine.rounds():
                if view.status == PENDING:
                    self._schedule_own(view.round_id, view.window_hours)
            task_status.started()
            await self._deadline_loop()

    async def _deadline_loop(self) -> None:
        while True:
            deadline = self.engine.next_deadline()
            wake = min(
                deadline if deadline is not None else float("inf"),
                self._timers[0][0] if self._timers else float("inf"),
            )
            with trio.move_on_at(wake):
                await self._deadline_changed.wait()
            self._deadline_changed = trio.Event()
            now = trio.current_time()
            self._run_timers(now)
            events = self.engine.expire(now)
            if events:
                await self._commit_events(events)

    def _run_timers(self, now: float) -> None:
        """Relays that lingered long enough go out. A round still Pending a while after
        we learned of it missed a relay (its starter died mid-round, an answer was lost):
        pull from every peer now rather than at the next anti-entropy tick — at most
        once per half round timeout, so an overloaded cluster, where every round is
        slow, is not also flooded with pulls."""
        stuck = False
        while self._timers and self._timers[0][0] <= now:
            _, kind, round_id = heapq.heappop(self._timers)
            if kind == _RELAY:
                self._flush_relays(round_id)
            else:
                stuck |= self.engine.status_of(round_id) == PENDING
        if stuck and now >= self._quiet_until:
            self._quiet_until = now + self._round_timeout / 2
            self.outbox.pull_soon()

    def _add_timer(self, delay: float, kind: str, round_id: str) -> None:
        heapq.heappush(self._timers, (trio.current_time() + delay, kind, round_id))
        self._deadline_changed.set()

    def _direct(self) -> bool:
        """Whether observations go straight to every peer rather than through the round's
        starter. Relaying costs N-1 requests against (N-1)(N-2) direct ones, so it only
        pays above 3 validators; at 3 the requests are equal and direct saves a hop."""
        return len(self.config.peers) <= DIRECT_FAN_OUT_MAX_VALIDATORS

    def _relay(self, obs: Observation) -> None:
        """Pass on a peer's observation for a round we started (it came back in the
        answer to our start). While the round is Pending they are held together
        (RELAY_LINGER at most), so each peer gets them in one batch, not one per answer;
        the round closing (every validator in, or its timeout) sends them at once."""
        held = self._relays.get(obs.round_id)
        if held is None:
            held = self._relays[obs.round_id] = []
            self._add_timer(RELAY_LINGER, _RELAY, obs.round_id)
        held.append(obs)
        if self.engine.status_of(obs.round_id) != PENDING:
            self._flush_relays(obs.round_id)

    def _flush_relays(self, round_id: str) -> None:
        for obs in self._relays.pop(round_id, ()):
            self.outbox.broadcast("observations", obs.to_dict(), exclude=(obs.node_id,))

    # --- inbound: external submit ----------------------------------------------------

    async def submit(self, payload: Any, remember_as: str | None = None) -> Reply:
        """POST /rpc/submit: validate, verify, decide, persist, then answer. With
        `remember_as` (an Idempotency-Key's name), the answer is committed with the
        observation, so a repeat gets it even after kill -9."""
        if not isinstance(payload, dict) or set(payload) != {"observation"}:
            reply = error_reply(
                422, "invalid_request", 'body must be {"observation": {...}}', "invalid"
            )
            self.metrics.observations_received.labels("invalid").inc()
            return reply
        try:
            obs = self._verified(payload["observation"])
        except _Rejected as rejected:
            if rejected.reply.metric:
                self.metrics.observations_received.labels(rejected.reply.metric).inc()
            return rejected.reply
        events = self.engine.add_observation(obs, trio.current_time())
        reply = self._submit_reply(events)
        extra = []
        if remember_as is not None and reply.status < 500:
            extra.append(Store.idempotency_stmt(remember_as, reply.status, reply.body))
        await self._commit_events(events, extra)
        return reply

    async def remember_answer(self, name: str, reply: Reply) -> None:
        """Make `reply` the durable answer to requests repeating an Idempotency-Key."""
        await self.store.commit([Store.idempotency_stmt(name, reply.status, reply.body)])

    def remembered_answer(self, name: str) -> Reply | None:
        stored = self.store.idempotent_answer(name)
        return None if stored is None else Reply(stored[0], stored[1])

    def _submit_reply(self, events: Iterable[ev.Event]) -> Reply:
        for event in events:
            if isinstance(event, ev.Duplicate):
                return Reply(
                    200, {"success": True, "message": "Observation accepted", "duplicate": True}
                )
            if isinstance(event, ev.ConflictDetected):
                return error_reply(409, "conflict", "Observation rejected (Byzantine detected)")
            if isinstance(event, ev.NotAValidator):
                return error_reply(403, "unknown_node", "node is not a validator of this round")
        return Reply(200, {"success": True, "message": "Observation accepted", "duplicate": False})

    def _verified(self, data: Any) -> Observation:
        try:
            obs = parse_observation(data)
        except ObservationError as exc:
            raise _Rejected(error_reply(422, "invalid_observation", str(exc), "invalid")) from exc
        public_key = self._pubkeys.get(obs.node_id)
        if public_key is None:
            raise _Rejected(
                error_reply(403, "unknown_node", f"unknown node_id {obs.node_id!r}", "unknown_node")
            )
        if not crypto.verify_observation(obs, public_key):
            raise _Rejected(
                error_reply(422, "bad_signature", "signature does not verify", "bad_signature")
            )
        return obs

    # --- inbound: peers ------------------------------------------------------------------

    async def gossip(self, payload: Any) -> Reply:
        """POST /rpc/gossip: ingest a peer's batch. The answer carries this node's own
        observations for the rounds the batch names, so the sender (the round's starter)
        relays them to everyone: about 2(N-1) requests a round instead of N(N-1)."""
        rounds = payload.get("rounds") if isinstance(payload, dict) else None
        round_ids = [
            item["round_id"]
            for item in (rounds if isinstance(rounds, list) else [])
            if isinstance(item, dict) and is_round_id(item.get("round_id"))
        ]
        asker = payload.get("from") if isinstance(payload, dict) else None
        with self._claim_own(round_ids, asker if isinstance(asker, str) else None) as answer:
            reply = await self.ingest(payload)
            if reply.status != 200:
                return reply
            own = await self._own_observations(answer, round_ids)
        if own:
            reply.body["observations"] = [obs.to_dict() for obs in own]
        return reply

    @contextlib.contextmanager
    def _claim_own(self, round_ids: list[str], asker: str | None) -> Iterator[_OwnAnswer]:
        """Claim our not yet released observations of these rounds for one message,
        before anything could sign them (so none is both broadcast and carried)."""
        answer = _OwnAnswer(asker)
        claimed = [
            round_id
            for round_id in dict.fromkeys(round_ids)
            if round_id not in self._answers
            and self.engine.observation_of(round_id, self.node_id) is None
        ]
        for round_id in claimed:
            self._answers[round_id] = answer
        try:
            yield answer
        finally:
            for round_id in claimed:
                if self._answers.get(round_id) is answer:
                    del self._answers[round_id]

    async def _own_observations(
        self, answer: _OwnAnswer, round_ids: list[str]
    ) -> list[Observation]:
        """Our observations for these rounds: released ones, and claimed ones being signed
        now, waited for at most OWN_ANSWER_WAIT (and half the server's request timeout, so
        the wait never turns the answer into a 503). One released later (a slow observer,
        the `observation.before_send` failpoint) is broadcast by `_publish_own` instead."""
        with trio.move_on_after(min(OWN_ANSWER_WAIT, self.config.limits.request_timeout / 2)):
            while any(
                self._answers.get(round_id) is answer and round_id in self._own_started
                for round_id in round_ids
            ):
                await answer.changed.wait()
                answer.changed = trio.Event()
        own = []
        for round_id in dict.fromkeys(round_ids):
            obs = answer.carried.get(round_id) or self.engine.observation_of(round_id, self.node_id)
            if obs is not None:
                own.append(obs)
        return own

    async def ingest(self, payload: Any) -> Reply:
        """Batched node-to-node traffic (gossip push, gossip answers, anti-entropy answers)."""
        if not isinstance(payload, dict):
            return error_reply(422, "invalid_request", "body must be a JSON object")
        rounds = payload.get("rounds", [])
        observations = payload.get("observations", [])
        evidence = payload.get("evidence", [])
        if not all(isinstance(x, list) for x in (rounds, observations, evidence)):
            return error_reply(
                422, "invalid_request", "rounds, observations, evidence must be lists"
            )
        if len(rounds) + len(observations) + len(evidence) > 4 * MAX_BATCH_ITEMS:
            return error_reply(413, "too_many_items", "batch too large")
        now = trio.current_time()
        events: list[ev.Event] = []
        counts = collections.Counter[str]()
        for item in rounds:
            if (
                isinstance(item, dict)
                and is_round_id(item.get("round_id"))
                and is_window_hours(item.get("window_hours"))
            ):
                events += self.engine.open_round(item["round_id"], item["window_hours"], now)
            else:
                counts["rejected"] += 1
        verified = []
        for data in observations:
            try:
                verified.append(self._verified(data))
            except _Rejected as rejected:
                counts["rejected"] += 1
                if rejected.reply.metric:
                    self.metrics.observations_received.labels(rejected.reply.metric).inc()
        events += self.engine.add_observations(verified, now)
        for item in evidence:
            try:
                pair = Evidence(self._verified(item["first"]), self._verified(item["second"]))
            except (_Rejected, KeyError, TypeError):
                counts["rejected"] += 1
                continue
            events += self.engine.add_evidence(pair, now)
        for event in events:
            counts[type(event).__name__] += 1
        await self._commit_events(events)
        return Reply(
            200,
            {
                "success": True,
                "accepted": counts["Accepted"],
                "duplicate": counts["Duplicate"],
                "rejected": counts["rejected"],
            },
        )

    def sync_answer(self, payload: Any) -> Reply:
        """Anti-entropy: what the asker lacks among our recent rounds and evidence."""
        if not isinstance(payload, dict) or not isinstance(payload.get("summary", {}), dict):
            return error_reply(422, "invalid_request", "expected {summary: {round_id: [node_id]}}")
        summary = payload.get("summary", {})
        known_evidence = payload.get("evidence", [])
        if not isinstance(known_evidence, list) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in summary.values()
        ):
            return error_reply(422, "invalid_request", "summary values must be lists of node ids")
        held = {
            (k[0], k[1])
            for k in known_evidence
            if isinstance(k, list) and len(k) == 2 and all(isinstance(x, str) for x in k)
        }
        lacking = [e for e in self.engine.evidence() if (e.node_id, e.round_id) not in held]
        evidence = lacking[: SYNC_ANSWER_ITEMS // 2]
        missing = self.engine.observations_missing_from(summary, SYNC_ROUNDS)
        room = SYNC_ANSWER_ITEMS - 2 * len(evidence)
        rounds = [
            {"round_id": round_id, "window_hours": window}
            for round_id, window in self.engine.recent_windows(SYNC_ROUNDS)
            if round_id not in summary
        ]
        return Reply(
            200,
            {
                "rounds": rounds,
                "observations": [o.to_dict() for o in missing[:room]],
                "evidence": [
                    {"first": e.first.to_dict(), "second": e.second.to_dict()} for e in evidence
                ],
                # Capped: the asker pulls again at once for what did not fit.
                "more": len(missing) > room or len(lacking) > len(evidence),
            },
        )

    def sync_request(self) -> dict[str, Any]:
        return {
            "from": self.node_id,
            "summary": self.engine.summary(SYNC_ROUNDS),
            "evidence": [[e.node_id, e.round_id] for e in self.engine.evidence()],
        }

    # --- rounds ----------------------------------------------------------------------------

    async def start_round(self, round_id: str | None, window_hours: int) -> str | None:
        """Start (idempotently) a round here and on every peer; None when it is too old to keep."""
        if round_id is None:
            round_id = self._fresh_round_id()
        events = self.engine.open_round(round_id, window_hours, trio.current_time())
        if any(isinstance(event, ev.RoundTooOld) for event in events):
            return None
        if any(isinstance(event, ev.RoundOpened) for event in events) and not self._direct():
            self._relaying.add(round_id)
        with self._claim_own([round_id], None) as answer:
            await self._commit_events(events)
            own = await self._own_observations(answer, [round_id])
        self.outbox.broadcast("rounds", {"round_id": round_id, "window_hours": window_hours})
        for obs in own:
            self.outbox.broadcast("observations", obs.to_dict())
        return round_id

    def _fresh_round_id(self) -> str:
        candidate = "round_" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        ids = self.engine.round_ids()
        if ids and candidate <= ids[-1]:
            candidate = ids[-1][:60] + ".1"
        return candidate

    def _schedule_own(self, round_id: str, window_hours: int) -> None:
        if round_id in self._own_started or self._nursery is None:
            return
        self._own_started.add(round_id)
        self._nursery.start_soon(self._sign_and_publish, round_id, window_hours)

    async def _sign_and_publish(self, round_id: str, window_hours: int) -> None:
        """Sign this node's observation for a round exactly once, persist, then send."""
        obs = self._own.get(round_id)
        if obs is None and round_id <= self._own_on_disk_through:
            obs = self.store.own_observation(round_id)
        if obs is None:
            await failpoints.hit_async("observation.before_sign")
            measurement = await self._observer.measure(round_id, window_hours)
            if measurement is None:
                self.metrics.observer_failures.inc()
                answer = self._answers.pop(round_id, None)
                if answer is not None:
                    answer.changed.set()  # nothing to carry: stop waiting for it
                return
            obs = crypto.sign_observation(
                self._key,
                node_id=self.node_id,
                audit_id=self._ids.next(),
                round_id=round_id,
                window_hours=window_hours,
                timestamp=format_utc(datetime.now(UTC)),
                forecast_hash=measurement.forecast_hash,
                outcome_hash=measurement.outcome_hash,
                tis_components=measurement.tis_components,
                tis_overall=measurement.tis_overall,
                bias_flags=measurement.bias_flags,
            )
            digest = crypto.observation_digest(obs)
            await self.store.commit([Store.own_stmt(obs), Store.observation_stmt(obs, digest)])
            self._own[round_id] = obs
        await self._publish_own(obs)

    async def _publish_own(self, obs: Observation) -> None:
        """Send: signing already made it durable (its `own` and observation rows).

        A gossip answer waiting for it carries it back to the round's starter, which
        relays it; otherwise it goes to every peer."""
        await failpoints.hit_async("observation.before_send")
        answer = self._answers.pop(obs.round_id, None)
        if answer is not None:
            answer.carry(obs)
            if answer.asker is not None and self._direct():
                self.outbox.broadcast("observations", obs.to_dict(), exclude=(answer.asker,))
        else:
            self.outbox.broadcast("observations", obs.to_dict())
        events = self.engine.add_observation(obs, trio.current_time())
        await self._commit_events(events)

    # --- events → durable effects ----------------------------------------------------------

    async def _commit_events(self, events: list[ev.Event], extra: Iterable[Statement] = ()) -> None:
        statements: list[Statement] = []
        audits: list[tuple[str, dict[str, Any]]] = []
        for event in events:
            self._effects(event, statements, audits)
        statements.extend(extra)
        if statements:
            await self.store.commit(statements)
        for name, fields in audits:
            async with self._audit_lock:
                await trio.to_thread.run_sync(
                    partial(self._audit.append, name, fields, durable=True)
                )
        self._deadline_changed.set()

    def _effects(
        self, event: ev.Event, statements: list[Statement], audits: list[tuple[str, dict[str, Any]]]
    ) -> None:
        metrics = self.metrics
        match event:
            case ev.RoundPruned(round_id=round_id):
                # The engine forgot it; the store still holds our signed observation, so
                # forgetting it here too cannot lead to signing the round twice.
                if self._own.pop(round_id, None) is not None:
                    self._own_on_disk_through = max(self._own_on_disk_through, round_id)
                self._own_started.discard(round_id)
                self._relaying.discard(round_id)
                self._relays.pop(round_id, None)
            case ev.RoundOpened(round_id=round_id, window_hours=window):
                statements.append(Store.round_stmt(round_id, window, time.time()))
                self._schedule_own(round_id, window)
                self._add_timer(STUCK_ROUND_FRACTION * self._round_timeout, _STUCK, round_id)
            case ev.Accepted(obs=obs):
                if obs.node_id != self.node_id:  # ours was written when it was signed
                    statements.append(Store.observation_stmt(obs, crypto.observation_digest(obs)))
                metrics.observations_received.labels("accepted").inc()
                if obs.round_id in self._relaying and obs.node_id != self.node_id:
                    self._relay(obs)
            case ev.Duplicate():
                metrics.observations_received.labels("duplicate").inc()
            case ev.NotAValidator():
                metrics.observations_received.labels("unknown_node").inc()
            case ev.ConflictDetected(evidence=evidence):
                statements.append(Store.evidence_stmt(evidence))
                metrics.observations_received.labels("conflict").inc()
                self.outbox.broadcast(
                    "evidence",
                    {"first": evidence.first.to_dict(), "second": evidence.second.to_dict()},
                )
            case ev.ByzantineDetected(record=record, first_time=first):
                metrics.byzantine_nodes.set(len(self.engine.byzantine))
                self.mark_state_dirty()
                if first:
                    log.warning(
                        "byzantine node detected: %s (%s) in round %s",
                        record.node_id,
                        record.reason,
                        record.round_id,
                    )
                    audits.append(
                        (
                            "byzantine_detected",
                            {
                                "byzantine_node": record.node_id,
                                "reason": record.reason,
                                "round_id": record.round_id,
                            },
                        )
                    )
            case ev.ByzantineCleared(node_id=node_id):
                log.warning(
                    "byzantine mark on %s cleared: late rounds broke its deviation window", node_id
                )
                metrics.byzantine_nodes.set(len(self.engine.byzantine))
                self.mark_state_dirty()
            case ev.RoundCompleted(
                round_id=round_id, result=result, first_time=first, duration=dur
            ):
                self._flush_relays(round_id)
                if first:
                    metrics.consensus_rounds.inc()
                    metrics.round_duration.observe(dur)
                    self._rounds_completed += 1
                    log.info(
                        "consensus reached for %s: tis=%s quorum met with %d nodes",
                        round_id,
                        result.consensus_tis,
                        len(result.participating_nodes),
                    )
                if result.consensus_tis is not None:
                    self._note_completed(round_id, result.consensus_tis)
                self.mark_state_dirty()
            case ev.ResultChanged(round_id=round_id, result=result):
                if self.engine.status_of(round_id) == COMPLETE and result.consensus_tis is not None:
                    self._note_completed(round_id, result.consensus_tis)
            case ev.RoundFailed(round_id=round_id):
                self._flush_relays(round_id)
                metrics.rounds_failed.inc()
                log.warning(
                    "round %s failed: quorum not reached before the round timeout", round_id
                )
            case _:
                pass

    def _note_completed(self, round_id: str, tis: float) -> None:
        self._completed_tis[round_id] = tis
        self._completed_tis.move_to_end(round_id)
        while len(self._completed_tis) > AVERAGE_WINDOW:
            self._completed_tis.popitem(last=False)
        self.metrics.average_tis.set(sum(self._completed_tis.values()) / len(self._completed_tis))

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
            snapshot = self._state_snapshot()
            await trio.to_thread.run_sync(self._state_file.update, snapshot.update_into)
            await trio.sleep(STATE_WRITE_INTERVAL)

    async def persist_state(self) -> None:
        """Write state.json now (clean shutdown)."""
        if self._state_file is not None:
            await trio.to_thread.run_sync(
                self._state_file.update, self._state_snapshot().update_into
            )

    def _state_snapshot(self) -> _StateSnapshot:
        last = self._last_completed()
        return _StateSnapshot(
            validator_count=len(self.config.peers),
            rounds_completed=self._rounds_completed,
            last_round_id=last.round_id if last else None,
            last_round_at=format_utc(datetime.fromtimestamp(self._wall(last.completed_at), UTC))
            if last and last.completed_at is not None
            else None,
            byzantine_nodes=sorted(self.engine.byzantine),
            peer_count=len(self.config.peers) - 1,
            last_peer_reload=self.reload_status.at,
            tls_enabled=self.config.tls.enabled,
        )

    def _last_completed(self) -> RoundView | None:
        """The Complete round with the highest id, without a view of every retained round."""
        for round_id in reversed(self.engine.round_ids()):
            if self.engine.status_of(round_id) == COMPLETE:
                return self.engine.round(round_id)
        return None

    def _recent_views(self, limit: int) -> list[RoundView]:
        """Views of the `limit` most recent rounds only (the engine retains up to 1000)."""
        views = (self.engine.round(round_id) for round_id in self.engine.round_ids()[-limit:])
        return [view for view in views if view is not None]

    def _wall(self, trio_time: float) -> float:
        return time.time() - (trio.current_time() - trio_time)

    # --- views -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "node_id": self.node_id, "version": __version__}

    def status(self) -> dict[str, Any]:
        views = self._recent_views(STATUS_ROUNDS)
        return {
            "node_id": self.node_id,
            "validator_count": len(self.config.peers),
            "quorum": self.config.quorum,
            "rounds": [
                {
                    "round_id": v.round_id,
                    "status": v.status,
                    "total_observations": len(v.observations),
                    "consensus_tis": v.result.consensus_tis,
                    "result_digest": v.result.digest,
                }
                for v in views
            ],
            "byzantine_nodes": [
                {
                    "node_id": r.node_id,
                    "reason": r.reason,
                    "round_id": r.round_id,
                    "detected_at": format_utc(
                        datetime.fromtimestamp(self._wall(r.detected_at), UTC)
                    ),
                    "evidence": [r.evidence.first.to_dict(), r.evidence.second.to_dict()]
                    if r.evidence
                    else [],
                }
                for r in sorted(self.engine.byzantine.values(), key=lambda r: r.node_id)
            ],
            "peers": self.peer_states(),
            "last_reload": attrs.asdict(self.reload_status),
        }


def round_view_json(view: RoundView) -> dict[str, Any]:
    return {
        "round_id": view.round_id,
        "status": view.status,
        "participating_nodes": list(view.result.participating_nodes),
        "total_observations": len(view.observations),
        "required_quorum": view.required_quorum,
        "consensus_tis": view.result.consensus_tis,
        "consensus_biases": list(view.result.consensus_biases),
        "observations": [o.to_dict() for o in sorted(view.observations, key=lambda o: o.node_id)],
        "result_digest": view.result.digest,
    }


@attrs.frozen
class _StateSnapshot:
    validator_count: int
    rounds_completed: int
    last_round_id: str | None
    last_round_at: str | None
    byzantine_nodes: list[str]
    peer_count: int
    last_peer_reload: str | None
    tls_enabled: bool

    def update_into(self, state: dict[str, Any]) -> None:
        consensus = state.setdefault("consensus", {})
        consensus.update(
            validator_count=self.validator_count,
            rounds_completed=self.rounds_completed,
            byzantine_nodes=self.byzantine_nodes,
        )
        if self.last_round_id is not None:
            consensus.update(last_round_id=self.last_round_id, last_round_at=self.last_round_at)
        network = state.setdefault("network", {})
        network.update(peer_count=self.peer_count, tls_enabled=self.tls_enabled)
        if self.last_peer_reload is not None:
            network["last_peer_reload"] = self.last_peer_reload
