"""Values the consensus engine hands back: results, Byzantine records and events.

Every `Engine` method returns a list of these small frozen events, in the order
things happened; the node service turns them into storage, audit entries, gossip
and metrics. The engine itself never does I/O.
"""

from __future__ import annotations

import attrs

from ..models import Evidence, Observation

CONFLICTING_OBSERVATIONS = "ConflictingObservations"
EXCESSIVE_DEVIATION = "ExcessiveDeviation"


@attrs.frozen
class RoundResult:
    """The agreed outcome of one round: a pure function of its counted observations."""

    consensus_tis: float | None
    """Median of counted `tis_overall` (mean of the two middle values); None if none counted."""
    consensus_biases: tuple[str, ...]
    """Flags reported by at least the round's quorum of counted nodes, sorted."""
    participating_nodes: tuple[str, ...]
    """Counted node ids, sorted."""
    digest: str
    """sha256 hex over the counted observation digests and the values above."""


@attrs.frozen
class ByzantineRecord:
    """Why and from which round on a node is excluded (rounds with id >= round_id)."""

    node_id: str
    reason: str
    """`ConflictingObservations` or `ExcessiveDeviation`."""
    round_id: str
    detected_at: float
    """`now` when this node got this record (round and reason) on this engine."""
    evidence: Evidence | None
    """The two conflicting observations for `ConflictingObservations`, else None."""


@attrs.frozen
class RoundOpened:
    """A round became known here: sign and send our own observation for it once."""

    round_id: str
    window_hours: int


@attrs.frozen
class RoundTooOld:
    """A round older than every retained round while at capacity: nothing stored."""

    round_id: str


@attrs.frozen
class RoundPruned:
    """A finished round was dropped from memory to keep `retain_rounds`."""

    round_id: str


@attrs.frozen
class Accepted:
    """A new observation was stored: persist and forward it."""

    obs: Observation


@attrs.frozen
class Duplicate:
    """An observation already held (same digest): nothing changed, never a conflict."""

    obs: Observation


@attrs.frozen
class NotAValidator:
    """The node is not in the validator set the round was created with: nothing stored."""

    obs: Observation


@attrs.frozen
class ConflictDetected:
    """A new conflicting pair (first has the smaller digest): persist, audit, gossip."""

    evidence: Evidence


@attrs.frozen
class InvalidEvidence:
    """Evidence that proves nothing (different nodes or rounds, or the same observation)."""

    reason: str


@attrs.frozen
class ByzantineDetected:
    """A node got a record, or its record moved (another round or reason)."""

    record: ByzantineRecord
    first_time: bool


@attrs.frozen
class ByzantineCleared:
    """A deviation record no longer holds (rounds learned late broke its window)."""

    node_id: str


@attrs.frozen
class RoundCompleted:
    """The round is Complete (>= quorum counted); `first_time` unless it was Complete before."""

    round_id: str
    result: RoundResult
    first_time: bool
    duration: float
    """now - learned_at."""


@attrs.frozen
class RoundFailed:
    """The round closed (or fell back) with fewer than quorum counted observations."""

    round_id: str


@attrs.frozen
class ResultChanged:
    """A Complete round's result changed (late observation or a new exclusion)."""

    round_id: str
    result: RoundResult


Event = (
    RoundOpened
    | RoundTooOld
    | RoundPruned
    | Accepted
    | Duplicate
    | NotAValidator
    | ConflictDetected
    | InvalidEvidence
    | ByzantineDetected
    | ByzantineCleared
    | RoundCompleted
    | RoundFailed
    | ResultChanged
)
