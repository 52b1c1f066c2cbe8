"""The invariants every simulated run must keep, and the ledgers that check them.

The checker watches the network (what each node sent, what each honest node answered
2xx, so acknowledged) and what the peer links ingested, and reads the nodes' engines,
stores and audit logs: at every restart (is everything acknowledged still there?),
every half second (drift, honest nodes flagged) and at the end of the run.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from anna_trio._exceptions import ObservationError
from anna_trio.audit import verify_audit_log
from anna_trio.consensus import PENDING
from anna_trio.consensus.events import CONFLICTING_OBSERVATIONS
from anna_trio.crypto import observation_digest, parse_public_key, verify_observation
from anna_trio.models import ClusterConfig, Observation, is_round_id, parse_observation
from anna_trio.node import Node
from anna_trio.transport.server import Request, Response
from anna_trio.wire import Batch

from .network import Sender

INVARIANTS = {
    "drift": "honest nodes holding the same observations report identical results",
    "honest-flagged": "no honest node is ever flagged Byzantine",
    "equivocator-missed": "every equivocating node is flagged by every honest node that saw both halves",
    "audit-ids": "audit_ids strictly increase per node, across its restarts, in what it sent and wrote",
    "lost-ack": "nothing acknowledged (2xx) is lost, power cuts included",
    "sign-once": "an honest node signs one observation per round, durable before it leaves",
    "round-open": "every round ends Complete or Failed",
    "diverged": "honest nodes converge after the heal",
    "server-error": "no request is answered 500",
    "idempotency": "a repeated Idempotency-Key gets the first answer",
    "unaudited": "every Byzantine mark an honest node holds has its entry in its audit log",
    "crash": "no node process dies of an exception",
}

ACKED_PATHS = ("/rpc/gossip", "/rpc/submit", "/rpc/round/start")


@attrs.frozen
class Violation:
    invariant: str
    detail: str
    at: float

    def __str__(self) -> str:
        when = f" at t={self.at:.3f}" if self.at >= 0 else ""
        return f"[{self.invariant}] {self.detail}{when}"


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:
        return -1.0


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _names(node_id: str, body: bytes) -> bool:
    """Whether the body may hold an observation of `node_id` (a cheap test first)."""
    return f'"node_id":"{node_id}"'.encode() in body


def _items(payload: Any, key: str) -> list[Any]:
    value = payload.get(key) if isinstance(payload, dict) else None
    return value if isinstance(value, list) else []


class Checker:
    """Ledgers of what was sent, seen and acknowledged; the checks over them."""

    def __init__(self, config: ClusterConfig, honest: Iterable[str]) -> None:
        self._pubkeys = {p.node_id: parse_public_key(p.pubkey) for p in config.peers}
        self.honest = frozenset(honest)
        self.violations: list[Violation] = []
        self._reported: set[tuple[str, str]] = set()
        self._parsed: dict[str, Observation | None] = {}  # JSON text -> valid observation
        # Per honest node: what it acknowledged, saw, and sent as its own.
        self._acked_rounds: dict[str, set[str]] = {n: set() for n in self.honest}
        self._acked_obs: dict[str, set[tuple[str, str, str]]] = {n: set() for n in self.honest}
        self._acked_evidence: dict[str, set[tuple[str, str]]] = {n: set() for n in self.honest}
        self._seen: dict[str, dict[tuple[str, str], set[str]]] = {n: {} for n in self.honest}
        self._own: dict[str, dict[str, Observation]] = {n: {} for n in self.honest}

    def violate(self, invariant: str, detail: str, *, key: str | None = None) -> None:
        """Record a violation once per (invariant, key)."""
        assert invariant in INVARIANTS, invariant
        if (invariant, key or detail) in self._reported:
            return
        self._reported.add((invariant, key or detail))
        self.violations.append(Violation(invariant, detail, _now()))

    # --- parsing what went over the wire ------------------------------------------------

    def _observation(self, data: Any) -> Observation | None:
        """The observation if it is one and validly signed by a validator (each
        distinct JSON object is parsed and verified once: most are re-sent many times)."""
        try:
            text = json.dumps(data, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):
            return None
        if text not in self._parsed:
            self._parsed[text] = self._parse(data)
        return self._parsed[text]

    def _parse(self, data: Any) -> Observation | None:
        try:
            obs = parse_observation(data)
        except ObservationError:
            return None
        key = self._pubkeys.get(obs.node_id)
        return obs if key is not None and verify_observation(obs, key) else None

    def _evidence(self, item: Any) -> tuple[Observation, Observation] | None:
        if not isinstance(item, dict):
            return None
        first, second = self._observation(item.get("first")), self._observation(item.get("second"))
        if first is None or second is None:
            return None
        if (first.node_id, first.round_id) != (second.node_id, second.round_id):
            return None
        if observation_digest(first) == observation_digest(second):
            return None
        return first, second

    # --- network hooks (network.Watcher) -----------------------------------------------

    def sent(self, sender: Sender, target: str, path: str, body: bytes) -> None:
        if sender.name in self.honest and sender.process is not None and _names(sender.name, body):
            for item in _items(_loads(body), "observations"):
                self._note_own(sender.name, item)

    def served(self, target: str, request: Request, response: Response) -> None:
        if response.status == 500:
            self.violate(
                "server-error", f"{target} answered 500 to {request.path}: {response.body!r}"
            )
        if target not in self.honest:
            return
        if _names(target, response.body):
            for item in _items(_loads(response.body), "observations"):
                self._note_own(target, item)
        if 200 <= response.status < 300 and request.path in ACKED_PATHS:
            self._acknowledged(target, request, response)

    def _acknowledged(self, node_id: str, request: Request, response: Response) -> None:
        payload = _loads(request.body)
        if request.path == "/rpc/round/start":
            answer = _loads(response.body)
            if isinstance(answer, dict) and is_round_id(answer.get("round_id")):
                self._acked_rounds[node_id].add(answer["round_id"])
            return
        if request.path == "/rpc/submit":
            observations = [payload.get("observation")] if isinstance(payload, dict) else []
        else:
            observations = _items(payload, "observations")
            for ref in _items(payload, "rounds"):
                if isinstance(ref, dict) and is_round_id(ref.get("round_id")):
                    window = ref.get("window_hours")
                    if (
                        isinstance(window, int)
                        and not isinstance(window, bool)
                        and 1 <= window <= 8760
                    ):
                        self._acked_rounds[node_id].add(ref["round_id"])
        for item in observations:
            obs = self._observation(item)
            if obs is not None:
                self._acked_obs[node_id].add((obs.round_id, obs.node_id, observation_digest(obs)))
                self._saw(node_id, obs)
        for item in _items(payload, "evidence"):
            pair = self._evidence(item)
            if pair is not None:
                self._acked_evidence[node_id].add((pair[0].node_id, pair[0].round_id))
                self._saw(node_id, *pair)

    def ingested(self, node_id: str, batch: Batch) -> None:
        """A peer link of `node_id` ingested an answer (durably: ingest returned)."""
        if node_id not in self.honest:
            return
        for item in batch.observations:
            obs = self._observation(item)
            if obs is not None:
                self._saw(node_id, obs)
        for item in batch.evidence:
            pair = self._evidence(item)
            if pair is not None:
                self._saw(node_id, *pair)

    def _saw(self, node_id: str, *observations: Observation) -> None:
        for obs in observations:
            self._seen[node_id].setdefault((obs.node_id, obs.round_id), set()).add(
                observation_digest(obs)
            )

    def _note_own(self, node_id: str, item: Any) -> None:
        if not isinstance(item, dict) or item.get("node_id") != node_id:
            return
        obs = self._observation(item)
        if obs is None:
            return
        first = self._own[node_id].setdefault(obs.round_id, obs)
        if observation_digest(first) != observation_digest(obs):
            self.violate(
                "sign-once",
                f"{node_id} sent two different observations for {obs.round_id} "
                f"(audit_ids {first.audit_id} and {obs.audit_id})",
                key=f"{node_id}|{obs.round_id}",
            )

    # --- at every restart -----------------------------------------------------------------

    def restored(self, node_id: str, db: sqlite3.Connection) -> None:
        """Right after a restart's restore, before the node talks to anyone (anti-entropy
        would hide a loss): everything it acknowledged, and its own observations that
        left it, are in its store."""
        if node_id not in self.honest:
            return

        def has(sql: str, *params: str) -> bool:
            return db.execute(sql, params).fetchone() is not None

        for round_id in sorted(self._acked_rounds[node_id]):
            if not has("SELECT 1 FROM rounds WHERE round_id = ?", round_id):
                self.violate("lost-ack", f"{node_id} lost round {round_id} it acknowledged")
        for round_id, obs_node, digest in sorted(self._acked_obs[node_id]):
            if not has(
                "SELECT 1 FROM observations WHERE round_id = ? AND node_id = ? AND digest = ?",
                round_id,
                obs_node,
                digest,
            ) and not has(
                "SELECT 1 FROM evidence WHERE node_id = ? AND round_id = ?", obs_node, round_id
            ):
                self.violate(
                    "lost-ack",
                    f"{node_id} lost {obs_node}'s observation for {round_id} it acknowledged",
                )
        for obs_node, round_id in sorted(self._acked_evidence[node_id]):
            if not has(
                "SELECT 1 FROM evidence WHERE node_id = ? AND round_id = ?", obs_node, round_id
            ):
                self.violate("lost-ack", f"{node_id} lost evidence against {obs_node} ({round_id})")
        for round_id, obs in sorted(self._own[node_id].items()):
            row = db.execute("SELECT body FROM own WHERE round_id = ?", (round_id,)).fetchone()
            kept = parse_observation(json.loads(row[0])) if row else None
            if kept is None or observation_digest(kept) != observation_digest(obs):
                self.violate(
                    "sign-once",
                    f"{node_id}'s own observation for {round_id} left it but is not what its "
                    "store holds after the restart",
                    key=f"{node_id}|{round_id}",
                )

    # --- while running, and at the end ----------------------------------------------------

    def check_nodes(self, nodes: Mapping[str, Node]) -> None:
        """Drift and Byzantine marks among the running honest nodes."""
        for node_id, node in nodes.items():
            for marked in sorted(self.honest.intersection(node.engine.byzantine)):
                record = node.engine.byzantine[marked]
                self.violate(
                    "honest-flagged",
                    f"{node_id} flagged honest {marked} ({record.reason}, {record.round_id})",
                    key=f"{node_id}|{marked}",
                )
        results: dict[tuple[str, tuple[str, ...], frozenset[str]], tuple[str, str]] = {}
        for node_id, node in sorted(nodes.items()):
            records = node.engine.byzantine
            for view in node.engine.rounds():
                held = tuple(sorted(observation_digest(o) for o in view.observations))
                excluded = frozenset(
                    n for n, record in records.items() if record.round_id <= view.round_id
                )
                key = (view.round_id, held, excluded)
                other = results.setdefault(key, (node_id, view.result.digest))
                if other[1] != view.result.digest:
                    self.violate(
                        "drift",
                        f"{view.round_id}: {other[0]} and {node_id} hold the same observations "
                        "but report different results",
                        key=view.round_id,
                    )

    def finish(
        self,
        nodes: Mapping[str, Node],
        audit_logs: Mapping[str, Path],
        handed_out: Mapping[str, list[int]],
    ) -> None:
        """The end of the run, every honest node up and the network healed."""
        self.check_nodes(nodes)
        for node_id, node in sorted(nodes.items()):
            for view in node.engine.rounds():
                if view.status == PENDING:
                    self.violate("round-open", f"{view.round_id} is still Pending on {node_id}")
            for (marked, round_id), digests in sorted(self._seen[node_id].items()):
                record = node.engine.byzantine.get(marked)
                if len(digests) > 1 and (
                    record is None
                    or record.reason != CONFLICTING_OBSERVATIONS
                    or record.round_id > round_id
                ):
                    self.violate(
                        "equivocator-missed",
                        f"{node_id} saw two observations of {marked} for {round_id} "
                        f"but holds {record.reason if record else 'no mark'} for it",
                    )
        self._converged(nodes)
        for node_id in sorted(self.honest):
            self._audit_ids(node_id, nodes[node_id], audit_logs[node_id], handed_out[node_id])

    def _converged(self, nodes: Mapping[str, Node]) -> None:
        states = {node_id: node_state(node) for node_id, node in sorted(nodes.items())}
        first_id, (first_rounds, first_marks) = next(iter(states.items()))
        for node_id, (rounds, marks) in states.items():
            if marks != first_marks:
                self.violate(
                    "diverged", f"{first_id} marks {first_marks} Byzantine, {node_id} {marks}"
                )
            theirs = {round_id: (status, digest) for round_id, status, digest in rounds}
            for round_id, status, digest in first_rounds:
                other = theirs.get(round_id)
                if other != (status, digest):
                    held = f"{other[0]} {other[1][:12]}" if other else "nothing"
                    self.violate(
                        "diverged",
                        f"{round_id}: {first_id} holds {status} {digest[:12]}, {node_id} {held}",
                        key=round_id,
                    )
            if len(theirs) != len(first_rounds):
                self.violate(
                    "diverged",
                    f"{first_id} holds {len(first_rounds)} rounds, {node_id} {len(theirs)}",
                )

    def _audit_ids(self, node_id: str, node: Node, audit_log: Path, handed_out: list[int]) -> None:
        for before, after in itertools.pairwise(handed_out):
            if after <= before:
                self.violate(
                    "audit-ids",
                    f"{node_id} handed out audit_id {after} after {before}",
                    key=node_id,
                )
                break
        verification = verify_audit_log(audit_log)
        if not verification.ok:
            self.violate(
                "audit-ids",
                f"{node_id}'s audit log fails verification at line {verification.first_bad_line}: "
                f"{verification.reason}",
            )
        used: dict[int, str] = {}
        issued = set(handed_out)

        def use(audit_id: int, what: str) -> None:
            if audit_id not in issued:
                self.violate(
                    "audit-ids", f"{node_id}: {what} has audit_id {audit_id}, never handed out"
                )
            if audit_id in used:
                self.violate(
                    "audit-ids", f"{node_id}: {what} and {used[audit_id]} share audit_id {audit_id}"
                )
            used[audit_id] = what

        audited: set[str] = set()
        with audit_log.open("rb") as lines:
            for line in lines:
                entry = json.loads(line)
                use(entry["audit_id"], f"audit entry {entry['event']}")
                if entry["event"] == "byzantine_detected":
                    audited.add(entry["byzantine_node"])
                    if entry["byzantine_node"] in self.honest:
                        self.violate(
                            "honest-flagged",
                            f"{node_id}'s audit log records honest {entry['byzantine_node']} "
                            "as Byzantine",
                            key=f"{node_id}|{entry['byzantine_node']}",
                        )
        for marked in sorted(set(node.engine.byzantine) - audited):
            self.violate("unaudited", f"{node_id} marks {marked} Byzantine; its audit log does not")
        for (body,) in node.store.disk.db.execute("SELECT body FROM own ORDER BY round_id"):
            obs = parse_observation(json.loads(body))
            use(obs.audit_id, f"its observation for {obs.round_id}")


NodeState = tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]


def node_state(node: Node) -> NodeState:
    """What converged honest nodes agree on: each round's status and result digest, and
    the Byzantine marks."""
    return (
        [(v.round_id, v.status, v.result.digest) for v in node.engine.rounds()],
        sorted((r.node_id, r.reason, r.round_id) for r in node.engine.byzantine.values()),
    )


def converged(nodes: Mapping[str, Node]) -> bool:
    """Every round closed and every node in the same state."""
    states = [node_state(node) for node in nodes.values()]
    return all(status != PENDING for _, status, _ in states[0][0]) and all(
        state == states[0] for state in states
    )
