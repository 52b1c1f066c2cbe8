"""What the RPC port answers, as JSON: the node's outcomes and views (SPEC §7).

Every error is ``{"success": false, "error": <code>, "message": <text>}``. Answers are
the transport's Response, encoded once: an Idempotency-Key keeps its bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .. import __version__
from ..consensus.engine import RoundView
from ..node import Node, SubmitOutcome
from ..transport.server import Response, error_response, json_response
from ..wire import evidence_json

STATUS_ROUNDS = 100

PeerStates = Callable[[], list[dict[str, Any]]]


REJECTION_STATUS = {
    "invalid": (422, "invalid_observation"),
    "bad_signature": (422, "bad_signature"),
}


def rejection_response(kind: str, message: str) -> Response:
    """An observation refused before the engine saw it (node.Rejected)."""
    status, code = REJECTION_STATUS.get(kind, (403, "unknown_node"))
    return error_response(status, code, message)


def submit_response(outcome: SubmitOutcome) -> Response:
    if outcome is SubmitOutcome.CONFLICT:
        return error_response(409, "conflict", "Observation rejected (Byzantine detected)")
    if outcome is SubmitOutcome.NOT_A_VALIDATOR:
        return error_response(403, "unknown_node", "node is not a validator of this round")
    duplicate = outcome is SubmitOutcome.DUPLICATE
    return json_response(
        200, {"success": True, "message": "Observation accepted", "duplicate": duplicate}
    )


def started_response(round_id: str) -> Response:
    return json_response(202, {"success": True, "round_id": round_id})


def health_json(node_id: str) -> dict[str, Any]:
    return {"status": "ok", "node_id": node_id, "version": __version__}


def round_json(view: RoundView) -> dict[str, Any]:
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


def status_json(node: Node, peer_states: PeerStates) -> dict[str, Any]:
    """GET /rpc/status: the last rounds, the Byzantine list, peers, the last reload."""
    return {
        "node_id": node.node_id,
        "validator_count": len(node.config.peers),
        "quorum": node.config.quorum,
        "rounds": [
            {
                "round_id": v.round_id,
                "status": v.status,
                "total_observations": len(v.observations),
                "consensus_tis": v.result.consensus_tis,
                "result_digest": v.result.digest,
            }
            for v in node.recent_rounds(STATUS_ROUNDS)
        ],
        "byzantine_nodes": [
            {
                "node_id": r.node_id,
                "reason": r.reason,
                "round_id": r.round_id,
                "detected_at": node.wall_time(r.detected_at),
                "evidence": list(evidence_json(r.evidence).values()) if r.evidence else [],
            }
            for r in sorted(node.engine.byzantine.values(), key=lambda r: r.node_id)
        ],
        "peers": peer_states(),
        "last_reload": attrs.asdict(node.reload_status),
    }
