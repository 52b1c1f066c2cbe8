"""How the work per round grows with the cluster, 3 to 50 nodes (sim.growth)."""

from __future__ import annotations

import json

from anna_trio.peers import ANTI_ENTROPY_INTERVAL

from .growth import measure_growth
from .runner import in_workers
from .test_sim import WORKERS

SIZES = (3, 5, 7, 15, 25, 50)


def test_work_per_round_as_the_cluster_grows() -> None:
    """Between pull waves a round costs 2(N-1) gossip requests (4 at 3 nodes, which
    send directly), every node signs once and verifies each other node's observation
    once, and completes with every node; anti-entropy pulls N(N-1)/3 times a second.
    A round started as the links pull costs more: peers that learn of it from a pull
    answer broadcast their observation to everyone (reported, not asserted)."""
    rows = in_workers(measure_growth, sorted(SIZES, reverse=True), WORKERS)[::-1]
    for row in rows:
        print(json.dumps(row))
    for row in rows:
        size = row["nodes"]
        assert row["complete_with"] == size, row
        assert row["signatures_per_round"] == size, row
        assert row["verifications_per_round"] == size * (size - 1), row
        assert row["gossip_requests_per_round"] == (4 if size == 3 else 2 * (size - 1)), row
        assert row["sync_requests_per_second"] == round(
            size * (size - 1) / ANTI_ENTROPY_INTERVAL, 1
        )
    print(json.dumps({"growth": rows}))
