"""What parsing a peer's observation costs: `parse_observation` (every node parses every
other node's observation every round) and `parse_batch` of a 3-observation gossip body.

Runs against whichever anna_trio is importable, so the same script measures a tree
before and after a change (`PYTHONPATH=<other checkout> python benchmarks/bench_parse.py`).
Where the strict converter is present, its path is measured too (what an observation
the shortcut does not take costs). Prints one JSON document, microseconds per call.

    python benchmarks/bench_parse.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from anna_trio import models, wire


def observation(node: int) -> dict[str, Any]:
    """A well-formed observation as it arrives in JSON (the signature is not checked here)."""
    return {
        "node_id": f"node_{node:03d}",
        "audit_id": 1234,
        "round_id": "round_000042",
        "window_hours": 24,
        "timestamp": "2026-12-04T03:00:00Z",
        "forecast_hash": "sha256:" + "a" * 64,
        "outcome_hash": "sha256:" + "b" * 64,
        "tis_components": {
            "prediction_accuracy": 0.91,
            "ethical_alignment": 0.88,
            "coherence_stability": 0.9,
        },
        "tis_overall": 0.897,
        "bias_flags": [],
        "signature": "c" * 128,
    }


def per_call_us(function: Callable[[], object], calls: int) -> float:
    """The best of five runs of `calls` calls, in µs a call (the least disturbed run)."""
    best = float("inf")
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(calls):
            function()
        best = min(best, time.perf_counter() - began)
    return round(best / calls * 1e6, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    calls = parser.parse_args().calls
    one = observation(2)
    body = {"from": "node_001", "observations": [observation(n) for n in (1, 2, 3)]}
    results: dict[str, Any] = {
        "module": models.__file__,
        "parse_observation_us": per_call_us(lambda: models.parse_observation(one), calls),
        "parse_batch_3_us": per_call_us(lambda: wire.parse_batch(body), calls // 3),
    }
    structure = getattr(models, "structure_message", None)
    if structure is not None:  # the strict converter, bypassing the shortcut
        results["converter_observation_us"] = per_call_us(
            lambda: structure(one, models.Observation, "observation"), calls
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
