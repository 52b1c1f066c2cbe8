"""Inline SVG charts of TIS over the last rounds, drawn on the server.

Pure functions from rounds to markup: no JavaScript, nothing fetched. Each chart is an
`<svg role="img">` named by its `<title>` and summarised by its `<desc>`; each point is
a `<circle class="point">` with its own `<title>` (round, series, value) for hover.
The consensus chart's y axis spans the values shown (padded, in steps of 0.05), so
drift between rounds shows; the validators' chart spans all of [0, 1], so a validator
far from the consensus shows as distance, without reading numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
from markupsafe import Markup, escape

from .source import RoundSummary

WIDTH, HEIGHT = 560, 240
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 12, 32
FULL = (0.0, 1.0)
STEP = 0.05
CONSENSUS_COLOUR = "#1f2937"
# Distinguishable on white (and in most colour-vision deficiencies, with the legend).
PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#b35900",
    "#8c564b",
    "#c2188b",
    "#0f7c8a",
    "#5f6b00",
    "#4b5563",
)


@attrs.frozen
class Series:
    """One line: `points` are (round index, TIS) pairs in round order."""

    label: str
    colour: str
    points: tuple[tuple[int, float], ...]
    dashed: bool = False


YRange = tuple[float, float]


def padded_range(values: Sequence[float]) -> YRange:
    """[low, high] around `values`: at least STEP of margin, on STEP boundaries, in [0, 1]."""
    if not values:
        return FULL
    low = max(0.0, math.floor((min(values) - STEP) / STEP) * STEP)
    high = min(1.0, math.ceil((max(values) + STEP) / STEP) * STEP)
    return (round(low, 2), round(high, 2))


def _x(index: int, count: int) -> float:
    return LEFT + (index + 0.5) * (WIDTH - LEFT - RIGHT) / max(count, 1)


def _y(tis: float, span: YRange) -> float:
    low, high = span
    clamped = min(max(tis, low), high)
    return TOP + (high - clamped) / (high - low) * (HEIGHT - TOP - BOTTOM)


def _axes(round_ids: Sequence[str], span: YRange) -> list[str]:
    parts = []
    low, high = span
    step = 0.25 if high - low > 0.5 else STEP if high - low > 0.15 else STEP / 2
    for k in range(round((high - low) / step) + 1):
        tick = low + k * step
        y = _y(tick, span)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:.3f}</text>'
        )
    if round_ids:
        baseline = HEIGHT - BOTTOM + 18
        parts.append(f'<text class="tick" x="{LEFT}" y="{baseline}">{escape(round_ids[0])}</text>')
        if len(round_ids) > 1:
            parts.append(
                f'<text class="tick" x="{WIDTH - RIGHT}" y="{baseline}" text-anchor="end">'
                f"{escape(round_ids[-1])}</text>"
            )
    return parts


def _series(series: Series, round_ids: Sequence[str], span: YRange) -> list[str]:
    count = len(round_ids)
    coords = [(_x(i, count), _y(tis, span), i, tis) for i, tis in series.points]
    dash = ' stroke-dasharray="6 4"' if series.dashed else ""
    parts = [f'<g class="series" data-series="{escape(series.label)}">']
    if len(coords) > 1:
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in coords)
        parts.append(
            f'<polyline class="line" fill="none" stroke="{series.colour}" stroke-width="2"'
            f'{dash} points="{points}"/>'
        )
    for x, y, i, tis in coords:
        parts.append(
            f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{series.colour}">'
            f"<title>{escape(round_ids[i])}: {escape(series.label)} {tis:.6f}</title></circle>"
        )
    parts.append("</g>")
    return parts


def _band(bounds: Sequence[tuple[int, float, float]], count: int, span: YRange) -> str:
    """A shaded polygon between per-round low and high values (the tolerated deviation)."""
    if not bounds:
        return ""
    top = [f"{_x(i, count):.1f},{_y(high, span):.1f}" for i, _, high in bounds]
    bottom = [f"{_x(i, count):.1f},{_y(low, span):.1f}" for i, low, _ in reversed(bounds)]
    if len(bounds) == 1:  # one round: a short bar rather than a zero-width polygon
        index, low, high = bounds[0]
        y_high, y_low = _y(high, span), _y(low, span)
        return (
            f'<rect class="band" x="{_x(index, count) - 6:.1f}" y="{y_high:.1f}" width="12" '
            f'height="{y_low - y_high:.1f}"/>'
        )
    return f'<polygon class="band" points="{" ".join(top + bottom)}"/>'


def tis_chart(
    *,
    chart_id: str,
    title: str,
    description: str,
    round_ids: Sequence[str],
    series: Sequence[Series],
    band: Sequence[tuple[int, float, float]] = (),
    span: YRange = FULL,
) -> Markup:
    """An SVG line chart of TIS per round; round i of `round_ids` is at x position i,
    the y axis covers `span`."""
    parts = [
        f'<svg id="{escape(chart_id)}" class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'aria-labelledby="{escape(chart_id)}-title {escape(chart_id)}-desc" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{escape(chart_id)}-title">{escape(title)}</title>',
        f'<desc id="{escape(chart_id)}-desc">{escape(description)}</desc>',
        *_axes(round_ids, span),
        _band(band, len(round_ids), span),
    ]
    for one in series:
        parts += _series(one, round_ids, span)
    parts.append("</svg>")
    return Markup("".join(parts))


def _span(values: Sequence[float]) -> str:
    return f"from {min(values):.4f} to {max(values):.4f}, latest {values[-1]:.4f}"


def consensus_chart(rounds: Sequence[RoundSummary]) -> Markup:
    """Consensus TIS, one point per Complete round."""
    round_ids = [r.round_id for r in rounds]
    points = tuple(
        (i, r.consensus_tis)
        for i, r in enumerate(rounds)
        if r.status == "Complete" and r.consensus_tis is not None
    )
    values = [tis for _, tis in points]
    description = (
        f"{len(points)} completed rounds of the last {len(rounds)}; consensus TIS " + _span(values)
        if values
        else "No completed round yet."
    )
    return tis_chart(
        chart_id="consensus-chart",
        title="Consensus TIS per completed round",
        description=description,
        round_ids=round_ids,
        series=[Series("consensus", CONSENSUS_COLOUR, points)],
        span=padded_range(values),
    )


def validators_chart(
    rounds: Sequence[RoundSummary],
    validators: Sequence[str],
    byzantine: frozenset[str],
    threshold: float,
) -> tuple[Markup, list[Series]]:
    """Each validator's own TIS per round, over a band of consensus ± the deviation
    threshold; Byzantine validators' lines are dashed. Returns the chart and its
    series (for the legend)."""
    round_ids = [r.round_id for r in rounds]
    series = []
    for index, node in enumerate(validators):
        points = tuple(
            (i, r.tis_by_node[node]) for i, r in enumerate(rounds) if node in r.tis_by_node
        )
        colour = PALETTE[index % len(PALETTE)]
        series.append(Series(node, colour, points, dashed=node in byzantine))
    band = [
        (i, r.consensus_tis - threshold, r.consensus_tis + threshold)
        for i, r in enumerate(rounds)
        if r.status == "Complete" and r.consensus_tis is not None
    ]
    described = [
        f"{one.label}{' (Byzantine)' if one.dashed else ''} "
        + _span([tis for _, tis in one.points])
        for one in series
        if one.points
    ]
    description = (
        "; ".join(described) + f". Shaded: consensus ± {threshold:g}."
        if described
        else "No observation yet."
    )
    chart = tis_chart(
        chart_id="validators-chart",
        title="Each validator's TIS per round",
        description=description,
        round_ids=round_ids,
        series=series,
        band=band,
    )
    return chart, series
