"""What the console reads: the `ConsoleSource` protocol and the frozen views it returns.

The console never touches the node itself. The daemon hands the app a `ConsoleSource`
(its adapter is `node_source.NodeConsoleSource`); tests hand it a fake. Everything here
is read-only operational status: no key material, nothing a reader could act with.
Observations are public signed statements (SPEC §3), shown as their JSON.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs


@attrs.frozen
class ValidatorView:
    """One validator as this node sees it; `last_seen` is RFC 3339 UTC or None."""

    node_id: str
    up: bool
    last_seen: str | None
    this_node: bool = False


@attrs.frozen
class RoundSummary:
    """One round's line: `participants` are the counted nodes, `tis_by_node` every held
    observation's `tis_overall` (a Byzantine node's included), `duration` seconds from
    when this node learned of the round to its completion."""

    round_id: str
    status: str
    validators: int
    participants: tuple[str, ...]
    consensus_tis: float | None
    result_digest: str
    duration: float | None
    tis_by_node: Mapping[str, float] = attrs.field(factory=dict)


@attrs.frozen
class RoundDetail:
    """A round's page: its summary and its observations (SPEC §3 JSON, by node id)."""

    summary: RoundSummary
    window_hours: int
    required_quorum: int
    consensus_biases: tuple[str, ...]
    observations: tuple[Mapping[str, Any], ...]


@attrs.frozen
class ByzantineView:
    """A node marked Byzantine; `evidence` is the two conflicting observations, or empty
    for ExcessiveDeviation (which has none to show)."""

    node_id: str
    reason: str
    round_id: str
    detected_at: str
    evidence: tuple[Mapping[str, Any], ...] = ()


@attrs.frozen
class ReloadView:
    """The last peers.yml reload: result `none` (not reloaded yet), `success` or `failure`."""

    result: str
    at: str | None
    error: str | None


@attrs.frozen
class StateView:
    """state.json's schema version and what the start-up migration did."""

    schema_version: int | None
    migration: str
    updated_at: str | None


@attrs.frozen
class ClusterView:
    """The cluster as this node sees it."""

    node_id: str
    version: str
    quorum: int
    deviation_threshold: float
    validators: tuple[ValidatorView, ...]


class ConsoleSource(Protocol):
    """The console's only view of the node: cheap synchronous reads of what it holds."""

    @property
    def audit_log(self) -> Path:
        """The audit log's path; the console checks its chain off the event loop."""
        ...

    def cluster(self) -> ClusterView: ...

    def recent_rounds(self, limit: int) -> Sequence[RoundSummary]:
        """The `limit` most recent rounds, oldest first."""
        ...

    def round_detail(self, round_id: str) -> RoundDetail | None:
        """A retained round, or None when this node does not know it."""
        ...

    def byzantine(self) -> Sequence[ByzantineView]:
        """Nodes currently marked Byzantine, by node id."""
        ...

    def last_reload(self) -> ReloadView: ...

    def state(self) -> StateView: ...
