"""The node-to-node messages (POST /rpc/gossip and /rpc/sync bodies) as frozen values.

Parsed at the edge — by the RPC routes for requests, by a peer link for answers — so
the node only ever sees these. Observations inside stay raw JSON here: the node checks
each one (schema and signature) and counts the ones it rejects, without refusing the
batch they came in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .models import Evidence, Observation, is_round_id, is_window_hours

MAX_BATCH_ITEMS = 1024


class MessageError(ValueError):
    """Raised when a body is not the message it should be; `status` is the HTTP answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@attrs.frozen
class RoundRef:
    round_id: str
    window_hours: int


@attrs.frozen
class Batch:
    """Rounds, observations and evidence pushed by a peer or carried in an answer."""

    rounds: tuple[RoundRef, ...] = ()
    observations: tuple[Any, ...] = ()  # raw observation objects
    evidence: tuple[Any, ...] = ()  # raw {"first": obs, "second": obs} objects
    sender: str | None = None  # the "from" a gossip push names
    malformed_rounds: int = 0  # round items that named no valid round
    more: bool = False  # a capped sync answer: there is more to pull

    @property
    def round_ids(self) -> list[str]:
        return [ref.round_id for ref in self.rounds]


@attrs.frozen
class SyncRequest:
    """An anti-entropy pull: what the asker holds of its recent rounds, and its evidence."""

    summary: Mapping[str, tuple[str, ...]]
    known_evidence: frozenset[tuple[str, str]]  # (node_id, round_id)
    sender: str | None = None
    fingerprints: Mapping[str, str] = attrs.field(factory=dict)  # round -> held_fingerprint


@attrs.frozen
class SyncAnswer:
    """What the asker lacks among our recent rounds and evidence."""

    rounds: tuple[RoundRef, ...]
    observations: tuple[Observation, ...]
    evidence: tuple[Evidence, ...]
    more: bool = False  # capped (SYNC_ANSWER_ITEMS): the asker pulls again for the rest


def parse_batch(payload: Any) -> Batch:
    """A gossip body or an answer carrying rounds/observations/evidence."""
    if not isinstance(payload, dict):
        raise MessageError(422, "invalid_request", "body must be a JSON object")
    rounds = payload.get("rounds", [])
    observations = payload.get("observations", [])
    evidence = payload.get("evidence", [])
    if not all(isinstance(x, list) for x in (rounds, observations, evidence)):
        raise MessageError(422, "invalid_request", "rounds, observations, evidence must be lists")
    if len(rounds) + len(observations) + len(evidence) > MAX_BATCH_ITEMS:
        raise MessageError(413, "too_many_items", "batch too large")
    refs = tuple(
        RoundRef(item["round_id"], item["window_hours"])
        for item in rounds
        if isinstance(item, dict)
        and is_round_id(item.get("round_id"))
        and is_window_hours(item.get("window_hours"))
    )
    sender = payload.get("from")
    return Batch(
        rounds=refs,
        observations=tuple(observations),
        evidence=tuple(evidence),
        sender=sender if isinstance(sender, str) else None,
        malformed_rounds=len(rounds) - len(refs),
        more=payload.get("more") is True,
    )


def parse_sync_request(payload: Any) -> SyncRequest:
    if not isinstance(payload, dict) or not isinstance(payload.get("summary", {}), dict):
        raise MessageError(422, "invalid_request", "expected {summary: {round_id: [node_id]}}")
    summary = payload.get("summary", {})
    known = payload.get("evidence", [])
    if not isinstance(known, list) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in summary.values()
    ):
        raise MessageError(422, "invalid_request", "summary values must be lists of node ids")
    fingerprints = payload.get("fingerprints", {})
    if not isinstance(fingerprints, dict) or not all(
        isinstance(v, str) for v in fingerprints.values()
    ):
        raise MessageError(422, "invalid_request", "fingerprints must map round ids to strings")
    sender = payload.get("from")
    return SyncRequest(
        summary={round_id: tuple(nodes) for round_id, nodes in summary.items()},
        fingerprints=fingerprints,
        known_evidence=frozenset(
            (k[0], k[1])
            for k in known
            if isinstance(k, list) and len(k) == 2 and all(isinstance(x, str) for x in k)
        ),
        sender=sender if isinstance(sender, str) else None,
    )


def evidence_json(evidence: Evidence) -> dict[str, Any]:
    return {"first": evidence.first.to_dict(), "second": evidence.second.to_dict()}


def sync_request_json(request: SyncRequest) -> dict[str, Any]:
    return {
        "from": request.sender,
        "summary": {round_id: list(nodes) for round_id, nodes in request.summary.items()},
        "fingerprints": dict(request.fingerprints),
        "evidence": [list(key) for key in sorted(request.known_evidence)],
    }


def sync_answer_json(answer: SyncAnswer) -> dict[str, Any]:
    return {
        "rounds": [attrs.asdict(ref) for ref in answer.rounds],
        "observations": [obs.to_dict() for obs in answer.observations],
        "evidence": [evidence_json(e) for e in answer.evidence],
        "more": answer.more,
    }
