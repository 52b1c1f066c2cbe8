"""The console's pure parts: server-drawn SVG charts and the request figures taken from
the metrics (histogram quantiles as Prometheus computes them)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anna_trio.console.charts import (
    HEIGHT,
    WIDTH,
    consensus_chart,
    padded_range,
    validators_chart,
)
from anna_trio.console.source import RoundSummary
from anna_trio.console.stats import histogram_quantile, peer_request_stats
from anna_trio.metrics import Metrics

SVG = "{http://www.w3.org/2000/svg}"
NODES = ("node_001", "node_002", "node_003", "a<b&c")
tis_values = st.floats(0, 1, allow_nan=False)


def _rounds(drawn: list[tuple[str, dict[str, float], float]]) -> list[RoundSummary]:
    return [
        RoundSummary(
            round_id=f"round:{n:03d}<&>",
            status=status,
            validators=len(NODES),
            participants=tuple(sorted(held)),
            consensus_tis=tis if status == "Complete" else None,
            result_digest="0" * 64,
            duration=None,
            tis_by_node=held,
        )
        for n, (status, held, tis) in enumerate(drawn)
    ]


def round_summaries() -> st.SearchStrategy[list[RoundSummary]]:
    """Up to the charts' 100 rounds: any status, any subset of validators observed."""
    one = st.tuples(
        st.sampled_from(["Complete", "Complete", "Failed", "Pending"]),
        st.dictionaries(st.sampled_from(NODES), tis_values, max_size=len(NODES)),
        tis_values,
    )
    return st.lists(one, max_size=100).map(_rounds)


def parse(markup: str) -> ET.Element:
    """The chart as XML: it must be well-formed (every label escaped)."""
    return ET.fromstring(markup)


def points(svg: ET.Element) -> list[ET.Element]:
    return [c for c in svg.iter(f"{SVG}circle") if c.get("class") == "point"]


def assert_inside(svg: ET.Element) -> None:
    for circle in points(svg):
        assert 0 <= float(circle.get("cx", "-1")) <= WIDTH
        assert 0 <= float(circle.get("cy", "-1")) <= HEIGHT


@given(round_summaries())
def test_consensus_chart_has_one_point_per_completed_round(rounds: list[RoundSummary]) -> None:
    """Exactly one point per Complete round, each inside the chart, titled with its
    round and value; the chart names and describes itself for screen readers."""
    svg = parse(consensus_chart(rounds))
    complete = [r for r in rounds if r.status == "Complete"]
    circles = points(svg)
    assert len(circles) == len(complete)
    assert_inside(svg)
    for circle, r in zip(circles, complete, strict=True):
        title = circle.find(f"{SVG}title")
        assert title is not None and title.text == f"{r.round_id}: consensus {r.consensus_tis:.6f}"
    assert svg.get("role") == "img"
    labelled = (svg.get("aria-labelledby") or "").split()
    assert [svg.find(f".//*[@id='{name}']") is not None for name in labelled] == [True, True]


@given(round_summaries(), st.frozensets(st.sampled_from(NODES)))
def test_validators_chart_has_each_validators_observations(
    rounds: list[RoundSummary], byzantine: frozenset[str]
) -> None:
    """One series per validator with one point per round it has an observation in;
    Byzantine validators' lines (and only theirs) are dashed."""
    markup, series = validators_chart(rounds, NODES, byzantine, 0.3)
    svg = parse(markup)
    groups = {g.get("data-series"): g for g in svg.iter(f"{SVG}g")}
    assert set(groups) == set(NODES)
    for node in NODES:
        expected = sum(node in r.tis_by_node for r in rounds)
        assert len([c for c in groups[node].iter(f"{SVG}circle")]) == expected
    assert {s.label for s in series if s.dashed} == byzantine
    assert_inside(svg)


@given(st.lists(tis_values, min_size=1, max_size=100))
def test_consensus_range_holds_every_value(values: list[float]) -> None:
    """The consensus chart's axis covers every value, on 0.05 steps, within [0, 1]."""
    low, high = padded_range(values)
    assert 0 <= low <= min(values) and max(values) <= high <= 1 and low < high
    for bound in (low, high):
        assert math.isclose(bound * 20, round(bound * 20), abs_tol=1e-9)


def test_histogram_quantile_matches_prometheus() -> None:
    """Linear inside the bucket; the +Inf bucket gives the highest finite bound; empty is None."""
    buckets = [(0.1, 50.0), (0.2, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1
    assert histogram_quantile(0.99, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None


@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=12),
    st.floats(0.01, 1.0),
    st.floats(0.01, 1.0),
)
def test_histogram_quantile_is_monotonic_and_within_the_buckets(
    increments: list[int], q1: float, q2: float
) -> None:
    """A higher quantile is never lower, and every quantile lies within [0, last bound]."""
    bounds = [0.001 * 2**i for i in range(len(increments))]
    counts, total = [], 0.0
    for increment in increments:
        total += increment
        counts.append(total)
    buckets = [*zip(bounds, counts, strict=True), (math.inf, total)]
    low, high = sorted((q1, q2))
    a, b = histogram_quantile(low, buckets), histogram_quantile(high, buckets)
    if total == 0:
        assert a is None and b is None
        return
    assert a is not None and b is not None
    assert 0 <= a <= b <= bounds[-1]


def test_peer_request_stats_from_the_metrics() -> None:
    """Success rate over every status, mean and p99 latency from the duration histogram."""
    metrics = Metrics("node_001")
    for status, count in (("success", 8), ("timeout", 1), ("error", 1)):
        metrics.peer_requests.labels("node_002", status).inc(count)
    for seconds in (0.002, 0.002, 0.004, 0.004):
        metrics.peer_request_duration.labels("node_002").observe(seconds)
    metrics.peer_requests.labels("node_003", "rejected").inc()
    stats = peer_request_stats(metrics)
    assert set(stats) == {"node_002", "node_003"}
    two = stats["node_002"]
    assert (two.requests, two.success_rate) == (10, 0.8)
    assert two.mean_latency == pytest.approx(0.003)
    assert two.p99_latency is not None and 0.0025 < two.p99_latency <= 0.005
    three = stats["node_003"]
    assert (three.requests, three.success_rate, three.mean_latency, three.p99_latency) == (
        1,
        0.0,
        None,
        None,
    )
