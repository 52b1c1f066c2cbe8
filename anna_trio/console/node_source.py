"""The daemon's `ConsoleSource`: the node's read-only views, adapted for the console.

The one console module that knows the node. It reads what the node already exposes —
the engine's round views and Byzantine records, the last reload, the config — the peer
links' states and the state file; it changes nothing. Whatever the node becomes, only
this adapter follows it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..consensus.engine import RoundView
from ..node import Node
from ..state.migration import MigrationOutcome
from ..state.statefile import StateFile
from ..wire import evidence_json
from .source import (
    ByzantineView,
    ClusterView,
    ReloadView,
    RoundDetail,
    RoundSummary,
    StateView,
    ValidatorView,
)


def _summary(view: RoundView) -> RoundSummary:
    completed = view.completed_at
    return RoundSummary(
        round_id=view.round_id,
        status=view.status,
        validators=len(view.validators),
        participants=view.result.participating_nodes,
        consensus_tis=view.result.consensus_tis,
        result_digest=view.result.digest,
        duration=None if completed is None else max(0.0, completed - view.learned_at),
        tis_by_node={obs.node_id: obs.tis_overall for obs in view.observations},
    )


class NodeConsoleSource:
    """`ConsoleSource` over a running Node."""

    def __init__(
        self,
        node: Node,
        *,
        peer_states: Callable[[], list[dict[str, Any]]],
        state_file: StateFile,
        migration: MigrationOutcome,
        audit_log: Path,
    ) -> None:
        self._node = node
        self._peer_states = peer_states
        self._state_file = state_file
        self._migration = migration
        self._audit_log = audit_log

    @property
    def audit_log(self) -> Path:
        return self._audit_log

    def cluster(self) -> ClusterView:
        node, config = self._node, self._node.config
        peers = {peer["node_id"]: peer for peer in self._peer_states()}
        validators = []
        for peer in config.peers:
            if peer.node_id == node.node_id:
                validators.append(ValidatorView(peer.node_id, True, None, this_node=True))
            else:
                state = peers.get(peer.node_id, {})
                validators.append(
                    ValidatorView(peer.node_id, bool(state.get("up")), state.get("last_seen"))
                )
        return ClusterView(
            node_id=node.node_id,
            version=__version__,
            quorum=config.quorum,
            deviation_threshold=config.byzantine_deviation_threshold,
            validators=tuple(validators),
        )

    def recent_rounds(self, limit: int) -> Sequence[RoundSummary]:
        engine = self._node.engine
        views = (engine.round(round_id) for round_id in engine.round_ids()[-limit:])
        return [_summary(view) for view in views if view is not None]

    def round_detail(self, round_id: str) -> RoundDetail | None:
        view = self._node.engine.round(round_id)
        if view is None:
            return None
        return RoundDetail(
            summary=_summary(view),
            window_hours=view.window_hours,
            required_quorum=view.required_quorum,
            consensus_biases=view.result.consensus_biases,
            observations=tuple(
                obs.to_dict() for obs in sorted(view.observations, key=lambda o: o.node_id)
            ),
        )

    def byzantine(self) -> Sequence[ByzantineView]:
        node = self._node
        return [
            ByzantineView(
                node_id=record.node_id,
                reason=record.reason,
                round_id=record.round_id,
                detected_at=node.wall_time(record.detected_at),
                evidence=tuple(evidence_json(record.evidence).values()) if record.evidence else (),
            )
            for record in sorted(node.engine.byzantine.values(), key=lambda r: r.node_id)
        ]

    def last_reload(self) -> ReloadView:
        status = self._node.reload_status
        return ReloadView(status.result, status.at, status.error)

    def state(self) -> StateView:
        data = self._state_file.data
        version = data.get("schema_version")
        return StateView(
            schema_version=version if isinstance(version, int) else None,
            migration=self._migration.value,
            updated_at=data.get("updated_at"),
        )
