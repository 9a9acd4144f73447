"""Charts as inline SVG, rendered on the server: no JavaScript library, no build step.

Every chart is a ``<figure>``: the SVG (``role="img"``, named by an ``aria-label`` that sums it up),
a y axis with round tick values and gridlines, date labels that do not overlap (every Nth day),
the exact value of every bar, segment and point in its SVG ``<title>`` (the browser shows it on
hover), an HTML legend, and the figures as a table inside ``<details>`` (the text alternative).
Numbers are written with thousands separators.

* ``bar_chart(points, title=…)`` — one series of (label, value) bars;
* ``stacked_bar_chart(labels, series, title=…)`` — one bar per day, one segment per series;
* ``line_chart(labels, series, title=…)`` — one line per series (a value of None is a gap).
"""

import math
from collections.abc import Callable, Sequence
from datetime import date
from html import escape as _escape

from django.utils.safestring import SafeString, mark_safe

# Okabe–Ito, distinguishable with the common colour-vision deficiencies; "other" is grey.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#8a6d00", "#6a3d9a")
OTHER_COLOR = "#8c8c8c"
TEXT = "#4a4a4a"  # 8.9:1 on white
GRID = "#e3e3e3"
FONT = 11
CHAR_PX = 6.6  # the width of a character of the axis font, near enough
Series = tuple[str, Sequence[float | None], str]  # (name, one value per label, colour)


def escape(text) -> str:
    """HTML-escaped text (the standard library's: Django's lazy-aware one costs ten times more, and a
    90-day chart escapes thousands of strings)."""
    return _escape(str(text), quote=True)


def number(value: float | None) -> str:
    """A count or amount with thousands separators (two decimals when it has a fraction)."""
    if value is None:
        return "–"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.2f}"


def percent(value: float | None) -> str:
    """A ratio (0..1) as a percentage."""
    if value is None:
        return "–"
    if 0 < value < 0.0005:
        return "<0.1%"  # not "0.0%": some is used
    return f"{value * 100:,.1f}%"


def milliseconds(value: float | None) -> str:
    return "–" if value is None else f"{number(value)} ms"


def color(index: int, name: str = "") -> str:
    return OTHER_COLOR if name.startswith("other") else PALETTE[index % len(PALETTE)]


def nice_ticks(top: float, *, count: int = 4, integer: bool = True) -> list[float]:
    """Round tick values from 0 to at least ``top`` (about ``count`` steps of 1, 2, 2.5 or 5 × 10^n)."""
    if top <= 0 or not math.isfinite(top):
        return [0, 1] if integer else [0, 0.25, 0.5, 0.75, 1]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1, math.ceil(step))
    steps = math.ceil(top / step - 1e-9)
    return [round(step * n, 10) for n in range(steps + 1)]


def _short(label) -> str:
    """An axis label: a date as "Dec 7", anything else as itself."""
    if isinstance(label, date):
        return f"{label:%b} {label.day}"
    return str(label)


def _full(label) -> str:
    return label.isoformat() if isinstance(label, date) else str(label)


class _Frame:
    """The plotting area of a chart: margins, the y scale and its ticks, the x slots."""

    def __init__(self, labels, top: float, *, width: int, height: int, fmt, integer: bool, compact: bool):
        self.labels, self.width, self.height, self.compact = list(labels), width, height, compact
        self.ticks = [] if compact else nice_ticks(top, integer=integer)
        self.top = (self.ticks[-1] if self.ticks else top) or 1
        tick_width = max((len(fmt(t)) for t in self.ticks), default=0) * CHAR_PX
        self.left = 2 if compact else tick_width + 10
        self.right = 2 if compact else 8
        self.plot_top = 2 if compact else 8
        self.bottom = height - (2 if compact else 20)
        self.slot = (width - self.left - self.right) / max(len(self.labels), 1)

    def y(self, value: float) -> float:
        return self.bottom - (value / self.top) * (self.bottom - self.plot_top)

    def x(self, index: int) -> float:
        return self.left + index * self.slot

    def axes(self, fmt) -> list[str]:
        parts = []
        for tick in self.ticks:
            y = self.y(tick)
            parts.append(
                f'<line x1="{self.left:.1f}" y1="{y:.1f}" x2="{self.width - self.right:.1f}" y2="{y:.1f}" '
                f'stroke="{GRID}" stroke-width="1"/>'
                f'<text x="{self.left - 4:.1f}" y="{y + 4:.1f}" font-size="{FONT}" fill="{TEXT}" '
                f'text-anchor="end">{escape(fmt(tick))}</text>'
            )
        parts.append(
            f'<line x1="{self.left:.1f}" y1="{self.bottom:.1f}" x2="{self.width - self.right:.1f}" '
            f'y2="{self.bottom:.1f}" stroke="#9a9a9a" stroke-width="1"/>'
        )
        if self.compact or not self.labels:
            return parts
        # Every Nth label, N such that each has room for its text, the last one always drawn.
        widest = max(len(_short(label)) for label in self.labels) * CHAR_PX + 8
        every = max(1, math.ceil(widest / self.slot))
        shown = set(range(0, len(self.labels), every))
        last = len(self.labels) - 1
        if last not in shown:
            shown.discard(max((i for i in shown if last - i < every), default=last))
            shown.add(last)
        for index in sorted(shown):
            center = self.x(index) + self.slot / 2
            anchor = "middle"
            if center - widest / 2 < 0:
                anchor, center = "start", max(center - self.slot / 2, 0)
            elif center + widest / 2 > self.width:
                anchor, center = "end", min(center + self.slot / 2, self.width)
            parts.append(
                f'<text x="{center:.1f}" y="{self.height - 5}" font-size="{FONT}" fill="{TEXT}" '
                f'text-anchor="{anchor}" class="x-label">{escape(_short(self.labels[index]))}</text>'
            )
        return parts


def _svg(title: str, summary: str, width: int, height: int, parts: list[str], kind: str, count: int) -> str:
    return (
        f'<svg class="chart chart-{kind}" role="img" aria-label="{escape(summary)}" '
        f'viewBox="0 0 {width} {height}" width="100%" preserveAspectRatio="xMidYMid meet" '
        f'style="display:block;max-width:100%;height:auto" data-points="{count}">'
        f"<title>{escape(summary)}</title>"
        "<style>.bar:hover,.point:hover{opacity:.7;stroke:#111;stroke-width:1.5}</style>" + "".join(parts) + "</svg>"
    )


def _legend(series: Sequence[Series]) -> str:
    items = "".join(
        '<li style="display:flex;align-items:center;gap:.3rem">'
        f'<span aria-hidden="true" style="display:inline-block;width:.8rem;height:.8rem;background:{escape(colour)}">'
        f"</span>{escape(name)}</li>"
        for name, _, colour in series
    )
    return (
        '<ul class="legend" style="list-style:none;display:flex;flex-wrap:wrap;gap:.3rem 1rem;'
        f'padding:0;margin:.3rem 0;font-size:.85rem">{items}</ul>'
    )


def _table(title: str, labels, series: Sequence[Series], fmt, *, total: bool) -> str:
    head = "".join(f'<th scope="col">{escape(name)}</th>' for name, _, _ in series)
    if total:
        head += '<th scope="col">Total</th>'
    rows = []
    for index, label in enumerate(labels):
        values = [values[index] for _, values, _ in series]
        cells = "".join(f"<td>{escape(fmt(value))}</td>" for value in values)
        if total:
            cells += f"<td>{escape(fmt(sum(v or 0 for v in values)))}</td>"
        rows.append(f'<tr><th scope="row">{escape(_full(label))}</th>{cells}</tr>')
    return (
        '<details class="chart-data" style="margin:.2rem 0 .6rem">'
        f"<summary>{escape(title)} — the figures</summary>"
        f'<div role="region" aria-label="{escape(title)}: the figures" tabindex="0" '
        'style="overflow-x:auto;max-height:24rem">'
        '<table class="chart-table"><thead><tr><th scope="col">Day</th>'
        + head
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div></details>"
    )


def _figure(title: str, svg: str, extra: str = "") -> SafeString:
    return mark_safe(
        '<figure class="chart-figure" style="margin:0 0 1rem">'
        + f'<figcaption style="font-weight:600;margin-bottom:.2rem">{escape(title)}</figcaption>'
        + svg
        + extra
        + "</figure>"
    )


def stacked_bar_chart(
    labels: Sequence,
    series: Sequence[Series],
    *,
    title: str,
    width: int = 720,
    height: int = 200,
    fmt: Callable[[float], str] = number,
    unit: str = "",
    legend: bool = True,
    table: bool = True,
    compact: bool = False,
) -> SafeString:
    """One bar per label (a date or a string), stacked from ``series`` — (name, values, colour), one
    value per label — bottom to top. Each segment's ``<title>``: the day, the series, its value and
    the day's total."""
    labels = list(labels)
    totals = [sum((values[i] or 0) for _, values, _ in series) for i in range(len(labels))]
    integer = all(float(v or 0).is_integer() for _, values, _ in series for v in values)
    frame = _Frame(
        labels, max(totals, default=0), width=width, height=height, fmt=fmt, integer=integer, compact=compact
    )
    parts = frame.axes(fmt)
    suffix = f" {unit}" if unit else ""
    gap = 1 if frame.slot > 4 else 0
    names = [escape(name) for name, _, _ in series]
    unit_text = escape(suffix)
    bar_width = f"{max(frame.slot - 2 * gap, 0.5):.1f}"
    for index, label in enumerate(labels):
        base, running, day = frame.bottom, 0, escape(_full(label))
        of = f" (of {escape(fmt(totals[index]))})" if len(series) > 1 else ""
        for (_, values, colour), name in zip(series, names, strict=True):
            value = values[index] or 0
            if value <= 0:
                continue
            running += value
            y = frame.y(running)
            shown = escape(fmt(value))
            text = f"{day} · {name}: {shown}{unit_text}{of}" if of else f"{day}: {shown}{unit_text}"
            parts.append(
                f'<rect class="bar" x="{frame.x(index) + gap:.1f}" y="{y:.1f}" width="{bar_width}" '
                f'height="{max(base - y, 0.5):.1f}" fill="{colour}" data-value="{value}" data-date="{day}">'
                f"<title>{text}</title></rect>"
            )
            base = y
    total = sum(totals)
    summary = f"{title}: {fmt(total)}{suffix} in all"
    if labels:
        peak = max(range(len(labels)), key=lambda i: totals[i])
        summary = (
            f"{title}, {_full(labels[0])} to {_full(labels[-1])}: {fmt(total)}{suffix} in all, "
            f"most on {_full(labels[peak])} ({fmt(totals[peak])}{suffix})"
        )
        if len(series) > 1:
            summary += "; by " + ", ".join(f"{name} {fmt(sum(v or 0 for v in values))}" for name, values, _ in series)
    svg = _svg(title, summary, width, height, parts, "bars", len(labels))
    extra = (_legend(series) if legend and len(series) > 1 else "") + (
        _table(title, labels, series, fmt, total=len(series) > 1) if table else ""
    )
    return _figure(title, svg, extra) if not compact else mark_safe(svg)


def bar_chart(
    points: list[tuple[str, float]], *, title: str, width: int = 720, height: int = 180, color: str = PALETTE[0]
) -> SafeString:
    """``points`` are (label, value) pairs, left to right (a label: a date or a string). Under 100 px
    high it is a sparkline (no axes, no table); every bar's label and value show on hover."""
    labels = [label for label, _ in points]
    compact = height < 100
    return stacked_bar_chart(
        labels,
        [(title, [value for _, value in points], color)],
        title=title,
        width=width,
        height=height,
        fmt=number,
        legend=False,
        table=not compact,
        compact=compact,
    )


def sparkline(
    values: list[float], *, title: str, width: int = 120, height: int = 24, color: str = "#417690"
) -> SafeString:
    """A tiny line of ``values`` (left to right, e.g. requests per day) with no axes, for a table
    cell; ``title`` says what it shows (its accessible name and hover text)."""
    top = max(values, default=0) or 1
    step = width / max(len(values) - 1, 1)
    points = " ".join(f"{i * step:.1f},{height - 1 - (v / top) * (height - 2):.1f}" for i, v in enumerate(values))
    return mark_safe(
        f'<svg class="sparkline" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" data-points="{len(values)}"><title>{escape(title)}</title>'
        f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/></svg>'
    )


def line_chart(
    labels: Sequence,
    series: Sequence[Series],
    *,
    title: str,
    width: int = 720,
    height: int = 200,
    fmt: Callable[[float], str] = number,
    unit: str = "",
) -> SafeString:
    """One line per series — (name, values, colour), one value per label, None for none that day
    (a gap) — with a dot at every value; each dot's ``<title>``: the day, the series and its value."""
    labels = list(labels)
    known = [v for _, values, _ in series for v in values if v is not None]
    integer = all(float(v).is_integer() for v in known)
    frame = _Frame(labels, max(known, default=0), width=width, height=height, fmt=fmt, integer=integer, compact=False)
    parts = frame.axes(fmt)
    suffix = f" {unit}" if unit else ""
    unit_text = escape(suffix)
    days = [escape(_full(label)) for label in labels]
    for number_of, (name, values, colour) in enumerate(series):
        runs, run = [], []
        for index, value in enumerate(values):
            if value is None:
                runs, run = runs + [run] if run else runs, []
                continue
            run.append((frame.x(index) + frame.slot / 2, frame.y(value)))
        if run:
            runs.append(run)
        dash = ("", ' stroke-dasharray="6 3"', ' stroke-dasharray="2 3"')[number_of % 3]
        for run in runs:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
            parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        safe_name = escape(name)
        for index, value in enumerate(values):
            if value is None:
                continue
            day = days[index]
            parts.append(
                f'<circle class="point" cx="{frame.x(index) + frame.slot / 2:.1f}" cy="{frame.y(value):.1f}" r="3.5" '
                f'fill="{colour}" data-value="{value}" data-date="{day}">'
                f"<title>{day} · {safe_name}: {escape(fmt(value))}{unit_text}</title></circle>"
            )
    summary = f"{title}: no data"
    if labels and known:
        summary = f"{title}, {_full(labels[0])} to {_full(labels[-1])}: " + "; ".join(
            f"{name} highest {fmt(max(v for v in values if v is not None))}{suffix}"
            for name, values, _ in series
            if any(v is not None for v in values)
        )
    svg = _svg(title, summary, width, height, parts, "lines", len(labels))
    return _figure(title, svg, _legend(series) + _table(title, labels, series, fmt, total=False))
