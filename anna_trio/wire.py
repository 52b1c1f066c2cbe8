"""The node-to-node messages (POST /rpc/gossip and /rpc/sync bodies and answers) as
frozen values, structured at the edge by the strict converter — by the RPC routes for
requests, by a peer link for answers — so the node only ever sees these.

The envelopes are strict (unknown keys, wrong types: 422); the items they carry are
judged one by one, so that one bad item does not cost the batch it came in: the node
checks each observation and evidence pair (schema and signature) and counts the ones
it rejects, a round item that names no valid round is counted too, and a sync
question's evidence keys that are no `[node_id, round_id]` pair are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
from cattrs.errors import BaseValidationError

from .converter import Invalid, Problem, between, converter, format_path, matches, problems
from .models import MAX_WINDOW_HOURS, ROUND_ID_RE, Evidence, Observation

MAX_BATCH_ITEMS = 1024
BATCH_LISTS = ("rounds", "observations", "evidence")
T = TypeVar("T")


class MessageError(ValueError):
    """Raised when a body is not the message it should be; `status` is the HTTP answer."""

    def __init__(
        self, status: int, code: str, message: str, found: list[Problem] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.problems = found or []


def _valid_items(item_type: Any, into: Callable[[list[Any]], T]) -> Callable[[Any, Any], T]:
    """A structure hook for a list whose items are kept only when each is an
    `item_type` (the lenient part of a message: see the module docstring)."""
    structure = converter.get_structure_hook(item_type)

    def valid_items(value: Any, _: Any) -> T:
        if not isinstance(value, list):
            raise Invalid("must be a list")
        kept = []
        for item in value:
            try:
                kept.append(structure(item, item_type))
            except (BaseValidationError, ValueError, TypeError):
                continue
        return into(kept)

    return valid_items


@attrs.frozen
class RoundRef:
    round_id: str = attrs.field(validator=matches(ROUND_ID_RE))
    window_hours: int = attrs.field(validator=between(1, MAX_WINDOW_HOURS))


@attrs.frozen
class IngestCounts:
    """What a node made of a batch (the gossip answer says it too)."""

    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0


@attrs.frozen
class Batch:
    """Rounds, observations and evidence pushed by a peer or carried in a sync answer.
    Observations and evidence stay raw JSON: the node judges each one."""

    rounds: tuple[RoundRef, ...] = attrs.field(
        default=(), metadata={"structure": _valid_items(RoundRef, tuple)}
    )
    observations: tuple[Any, ...] = ()
    evidence: tuple[Any, ...] = ()
    sender: str | None = attrs.field(default=None, metadata={"key": "from"})  # a push's
    more: bool = False  # a capped sync answer: there is more to pull
    malformed_rounds: int = attrs.field(  # round items that named no valid round
        default=0, metadata={"document": False}
    )

    @property
    def round_ids(self) -> list[str]:
        return [ref.round_id for ref in self.rounds]


@attrs.frozen
class GossipAnswer(IngestCounts):
    """The answer to a gossip push: the counts, and the receiver's own observations
    for the rounds the push named (raw: the sender's node judges them)."""

    success: bool = True
    observations: tuple[Any, ...] = ()


@attrs.frozen
class SyncRequest:
    """An anti-entropy pull: what the asker holds of its recent rounds, and its evidence."""

    summary: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    known_evidence: frozenset[tuple[str, str]] = attrs.field(  # (node_id, round_id)
        factory=frozenset,
        metadata={"key": "evidence", "structure": _valid_items(tuple[str, str], frozenset)},
    )
    sender: str | None = attrs.field(default=None, metadata={"key": "from"})
    fingerprints: Mapping[str, str] = attrs.field(factory=dict)  # round -> held_fingerprint


@attrs.frozen
class SyncAnswer:
    """What the asker lacks among our recent rounds and evidence."""

    rounds: tuple[RoundRef, ...]
    observations: tuple[Observation, ...]
    evidence: tuple[Evidence, ...]
    more: bool = False  # capped (SYNC_ANSWER_ITEMS): the asker pulls again for the rest


def structure_body(payload: Any, cls: type[T]) -> T:
    """`payload` as a `cls`, or MessageError 422 naming every problem."""
    try:
        return converter.structure(payload, cls)
    except (BaseValidationError, Invalid) as exc:
        found = problems(exc)
        message = "; ".join(
            f"{format_path(p.path) if p.path else 'body'}: {p.message}" for p in found
        )
        raise MessageError(422, "invalid_request", message, found) from None


def parse_batch(payload: Any) -> Batch:
    """A gossip push or a sync answer; 413 when it carries over MAX_BATCH_ITEMS items."""
    raw = payload if isinstance(payload, dict) else {}
    count = sum(len(raw[kind]) for kind in BATCH_LISTS if isinstance(raw.get(kind), list))
    if count > MAX_BATCH_ITEMS:
        raise MessageError(413, "too_many_items", "batch too large")
    batch = structure_body(payload, Batch)
    return attrs.evolve(batch, malformed_rounds=len(raw.get("rounds", ())) - len(batch.rounds))


def parse_gossip_answer(payload: Any) -> GossipAnswer:
    return structure_body(payload, GossipAnswer)


def parse_sync_request(payload: Any) -> SyncRequest:
    return structure_body(payload, SyncRequest)


def evidence_json(evidence: Evidence) -> dict[str, Any]:
    return {"first": evidence.first.to_dict(), "second": evidence.second.to_dict()}


def gossip_answer_json(counts: IngestCounts, own: list[Observation]) -> dict[str, Any]:
    answer = GossipAnswer(**attrs.asdict(counts), observations=tuple(o.to_dict() for o in own))
    body: dict[str, Any] = converter.unstructure(answer)
    if not own:
        del body["observations"]
    return body


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
