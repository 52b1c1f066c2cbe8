"""A fake ConsoleSource for the console's tests: three validators, three rounds (one
Failed), node_003 Byzantine with two conflicting observations, a failed reload."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from anna_trio import __version__
from anna_trio.console.source import (
    ByzantineView,
    ClusterView,
    ReloadView,
    RoundDetail,
    RoundSummary,
    StateView,
    ValidatorView,
)

DIGEST = "ab" * 32


def observation(node: str, round_id: str, tis: float, audit_id: int = 1) -> dict[str, Any]:
    return {
        "node_id": node,
        "audit_id": audit_id,
        "round_id": round_id,
        "window_hours": 24,
        "timestamp": "2026-12-04T00:00:00Z",
        "forecast_hash": "sha256:" + "1" * 64,
        "outcome_hash": "sha256:" + "2" * 64,
        "tis_components": {
            "prediction_accuracy": tis,
            "ethical_alignment": tis,
            "coherence_stability": tis,
        },
        "tis_overall": tis,
        "bias_flags": ["RecencyBias"],
        "signature": "c" * 128,
    }


def summary(round_id: str, status: str = "Complete", tis: float | None = 0.85) -> RoundSummary:
    counted = ("node_001", "node_002") if status == "Complete" else ("node_001",)
    return RoundSummary(
        round_id=round_id,
        status=status,
        validators=3,
        participants=counted,
        consensus_tis=tis,
        result_digest=DIGEST,
        duration=0.0123 if status != "Pending" else None,
        tis_by_node={"node_001": 0.85, "node_002": 0.86, "node_003": 0.15},
    )


@attrs.define
class FakeSource:
    """A ConsoleSource with canned answers: three validators, node_003 Byzantine."""

    audit_log: Path
    rounds: list[RoundSummary] = attrs.Factory(
        lambda: [summary("round_1"), summary("round_2", "Failed", None), summary("round_3")]
    )
    byzantine_nodes: list[ByzantineView] = attrs.Factory(
        lambda: [
            ByzantineView(
                "node_003",
                "ConflictingObservations",
                "round_3",
                "2026-12-04T00:00:01Z",
                (
                    observation("node_003", "round_3", 0.85, 10),
                    observation("node_003", "round_3", 0.15, 11),
                ),
            )
        ]
    )
    reload: ReloadView = attrs.Factory(
        lambda: ReloadView("failure", "2026-12-04T00:00:02Z", "peers.yml:3: quorum: bad")
    )
    broken: bool = False

    def cluster(self) -> ClusterView:
        if self.broken:
            raise RuntimeError("the node went away")
        return ClusterView(
            node_id="node_001",
            version=__version__,
            quorum=2,
            deviation_threshold=0.3,
            validators=(
                ValidatorView("node_001", True, None, this_node=True),
                ValidatorView("node_002", True, "2026-12-04T00:00:00Z"),
                ValidatorView("node_003", False, None),
            ),
        )

    def recent_rounds(self, limit: int) -> Sequence[RoundSummary]:
        return self.rounds[-limit:]

    def round_detail(self, round_id: str) -> RoundDetail | None:
        found = next((r for r in self.rounds if r.round_id == round_id), None)
        if found is None:
            return None
        held = tuple(observation(n, round_id, t) for n, t in sorted(found.tis_by_node.items()))
        return RoundDetail(found, 24, 2, ("RecencyBias",), held)

    def byzantine(self) -> Sequence[ByzantineView]:
        return self.byzantine_nodes

    def last_reload(self) -> ReloadView:
        return self.reload

    def state(self) -> StateView:
        return StateView(2, "migrated", "2026-12-04T00:00:03Z")
