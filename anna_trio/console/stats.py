"""Per-peer request figures for the console, read from the node's own metrics.

The same series Prometheus scrapes (`anna_peer_request_total`,
`anna_peer_request_duration_seconds`), summarised since start: success rate, mean and
99th-percentile latency (estimated from the histogram buckets as Prometheus'
`histogram_quantile` does).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import attrs
from prometheus_client.metrics_core import Metric

from ..metrics import Metrics


@attrs.frozen
class RequestStats:
    """Outbound requests to one peer since this node started."""

    requests: int
    success_rate: float | None
    mean_latency: float | None
    p99_latency: float | None


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The q-quantile of a cumulative histogram, given as (upper bound, count) pairs
    sorted by bound and ending with +Inf; None when it holds no observation. Linear
    interpolation inside the bucket; a rank in the +Inf bucket gives the highest
    finite bound, as in Prometheus."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank and count > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _samples(families: Iterable[Metric], name: str) -> Iterable[tuple[dict[str, str], float]]:
    for family in families:
        for sample in family.samples:
            if sample.name == name:
                yield sample.labels, sample.value


def peer_request_stats(metrics: Metrics) -> dict[str, RequestStats]:
    """RequestStats by peer node id, for every peer this node has sent a request to."""
    by_status: defaultdict[str, dict[str, float]] = defaultdict(dict)
    for labels, value in _samples(metrics.peer_requests.collect(), "anna_peer_request_total"):
        by_status[labels["peer"]][labels["status"]] = value
    durations = list(metrics.peer_request_duration.collect())
    buckets: defaultdict[str, list[tuple[float, float]]] = defaultdict(list)
    for labels, value in _samples(durations, "anna_peer_request_duration_seconds_bucket"):
        buckets[labels["peer"]].append((float(labels["le"]), value))
    sums = dict(
        (labels["peer"], value)
        for labels, value in _samples(durations, "anna_peer_request_duration_seconds_sum")
    )
    counts = dict(
        (labels["peer"], value)
        for labels, value in _samples(durations, "anna_peer_request_duration_seconds_count")
    )
    stats = {}
    for peer, statuses in by_status.items():
        total = sum(statuses.values())
        timed = counts.get(peer, 0.0)
        stats[peer] = RequestStats(
            requests=int(total),
            success_rate=statuses.get("success", 0.0) / total if total else None,
            mean_latency=sums.get(peer, 0.0) / timed if timed else None,
            p99_latency=histogram_quantile(0.99, sorted(buckets.get(peer, []))),
        )
    return stats
