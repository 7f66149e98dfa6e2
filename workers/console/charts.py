"""The overview's chart, drawn on the server as inline SVG (no script, nothing fetched):
per stage, the jobs done and their p95 latency in each time bucket of the last hours."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

from markupsafe import Markup

STAGES = ("purchase", "allocation", "sessions")
COLOURS = {"purchase": "#1f5fbf", "allocation": "#c26a00", "sessions": "#16825d"}
WIDTH = 880
PANEL_HEIGHT = 170
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 28, 28


@dataclass(frozen=True)
class StagePoint:
    """One row of console_stage_chart: a stage's jobs done in one bucket, and their latency."""

    stage: str
    bucket: datetime
    done: int
    p50_ms: float | None
    p95_ms: float | None


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^k at or above `value`."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in (1.0, 2.0, 5.0, 10.0) if step * power >= value)


def axis_top(value: float, ticks: int = 4) -> float:
    """An axis' top at or above `value` whose `ticks` equal steps are round numbers."""
    return ticks * nice_ceiling(value / ticks)


def short_ms(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:g} s"
    return f"{value:g} ms"


@dataclass(frozen=True)
class Panel:
    title: str
    top: float  # the panel's y offset in the drawing
    value: Callable[[StagePoint], float | None]
    label: Callable[[float], str]
    zero_when_missing: bool  # jobs done: a bucket without jobs is 0; latency: a gap


def stage_chart(
    points: Sequence[StagePoint], now: datetime, span: timedelta, bucket: timedelta
) -> Markup:
    """Two panels over the same time axis (UTC): jobs done per bucket, and p95 latency."""
    step = bucket.total_seconds()
    first = datetime.fromtimestamp(
        math.floor((now - span).timestamp() / step) * step, tz=now.tzinfo
    )
    count = math.ceil((now - first).total_seconds() / step)
    buckets = [first + i * bucket for i in range(count)]
    by_key = {(p.stage, p.bucket.timestamp()): p for p in points}
    panels = [
        Panel(
            f"jobs done per {int(step // 60)} min", 0, lambda p: p.done, lambda v: f"{v:g}", True
        ),
        Panel(
            "p95 latency (enqueue to outcome)", PANEL_HEIGHT, lambda p: p.p95_ms, short_ms, False
        ),
    ]
    hours = span.total_seconds() / 3600
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} '
        f'{2 * PANEL_HEIGHT + 24}" role="img" aria-labelledby="chart-title chart-desc">',
        f'<title id="chart-title">Jobs done and p95 latency per stage, last {hours:g} hours'
        "</title>",
        f'<desc id="chart-desc">{escape(describe(points))}</desc>',
    ]
    for panel in panels:
        parts += draw_panel(panel, buckets, by_key, step)
    parts += legend(2 * PANEL_HEIGHT + 8)
    parts.append("</svg>")
    return Markup("".join(parts))


def describe(points: Sequence[StagePoint]) -> str:
    if not points:
        return "No stage finished a job in this period."
    totals = {s: sum(p.done for p in points if p.stage == s) for s in STAGES}
    return "Jobs done: " + ", ".join(f"{s} {n}" for s, n in totals.items()) + "."


def draw_panel(
    panel: Panel,
    buckets: list[datetime],
    by_key: dict[tuple[str, float], StagePoint],
    step: float,
) -> list[str]:
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = PANEL_HEIGHT - TOP - BOTTOM
    y0 = panel.top + TOP
    series: dict[str, list[float | None]] = {}
    for stage in STAGES:
        values: list[float | None] = []
        for at in buckets:
            point = by_key.get((stage, at.timestamp()))
            value = panel.value(point) if point is not None else None
            values.append(0.0 if value is None and panel.zero_when_missing else value)
        series[stage] = values
    present = [v for values in series.values() for v in values if v is not None]
    top = axis_top(max(present, default=0.0))

    def x(i: int) -> float:
        return LEFT + plot_w * (i + 0.5) / len(buckets)

    def y(value: float) -> float:
        return y0 + plot_h * (1 - value / top)

    out = [
        f'<text x="{LEFT}" y="{panel.top + 16}" class="chart-title" font-size="13" '
        f'font-weight="600" fill="#222">{escape(panel.title)}</text>'
    ]
    for k in range(5):
        value = top * k / 4  # axis_top's four steps
        out.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            f'stroke="#ddd" stroke-width="1"/>'
            f'<text x="{LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#555">{escape(panel.label(value))}</text>'
        )
    labels_every = max(1, round(2 * 3600 / step))  # a time label every two hours
    for i, at in enumerate(buckets):
        if i % labels_every == 0:
            out.append(
                f'<text x="{x(i):.1f}" y="{y0 + plot_h + 16:.1f}" text-anchor="middle" '
                f'font-size="11" fill="#555">{at:%H:%M} UTC</text>'
            )
    if not present or (panel.zero_when_missing and max(present) == 0):
        out.append(
            f'<text x="{LEFT + plot_w / 2}" y="{y0 + plot_h / 2}" text-anchor="middle" '
            f'font-size="12" fill="#777">no job finished in this period</text>'
        )
        return out
    for stage, values in series.items():
        colour = COLOURS[stage]
        run: list[str] = []
        for i, value in enumerate([*values, None]):
            if value is not None:
                run.append(f"{x(i):.1f},{y(value):.1f}")
                continue
            if len(run) > 1:
                out.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                    f'points="{" ".join(run)}"><title>{stage}</title></polyline>'
                )
            elif run:
                cx, cy = run[0].split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>')
            run = []
    return out


def legend(y: float) -> list[str]:
    out = []
    for i, stage in enumerate(STAGES):
        x = LEFT + i * 140
        out.append(
            f'<rect x="{x}" y="{y}" width="14" height="4" fill="{COLOURS[stage]}"/>'
            f'<text x="{x + 20}" y="{y + 6}" font-size="12" fill="#222">{stage}</text>'
        )
    return out
