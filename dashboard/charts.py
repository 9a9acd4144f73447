"""Bar charts as inline SVG, rendered on the server: no JavaScript library, no build step."""

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe


def bar_chart(
    points: list[tuple[str, float]], *, title: str, width: int = 720, height: int = 180, color: str = "#417690"
) -> SafeString:
    """``points`` are (label, value) pairs, left to right; the first and last labels are drawn under
    the bars, and every bar's label and value show on hover."""
    top = max((value for _, value in points), default=0) or 1
    n = max(len(points), 1)
    bar = width / n
    base = height - 14  # room for the labels under the bars
    bars = []
    for index, (label, value) in enumerate(points):
        h = (value / top) * (base - 20)
        x = index * bar
        bars.append(
            f'<rect x="{x + 1:.1f}" y="{base - h:.1f}" width="{max(bar - 2, 1):.1f}" height="{h:.1f}" '
            f'fill="{color}"><title>{escape(label)}: {value:.4g}</title></rect>'
        )
    bars.append(f'<line x1="0" y1="{base}" x2="{width}" y2="{base}" stroke="#bbb" stroke-width="1"/>')
    if points:
        bars.append(f'<text x="2" y="{height - 2}" font-size="11" fill="#666">{escape(points[0][0])}</text>')
        bars.append(
            f'<text x="{width - 2}" y="{height - 2}" font-size="11" fill="#666" text-anchor="end">'
            f"{escape(points[-1][0])}</text>"
        )
    return mark_safe(
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
        f'width="100%" height="{height}" preserveAspectRatio="none" data-points="{len(points)}">'
        f"<title>{escape(title)}</title>"
        f'<text x="4" y="14" font-size="12" fill="#555">{escape(title)} (max {top:.4g})</text>'
        + "".join(bars)
        + "</svg>"
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
