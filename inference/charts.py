"""Bar charts as inline SVG, rendered on the server: no JavaScript library, no build step."""

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe


def bar_chart(
    points: list[tuple[str, float]], *, title: str, width: int = 720, height: int = 180, color: str = "#417690"
) -> SafeString:
    """``points`` are (label, value) pairs, left to right."""
    top = max((value for _, value in points), default=0) or 1
    n = max(len(points), 1)
    bar = width / n
    bars = []
    for index, (label, value) in enumerate(points):
        h = (value / top) * (height - 20)
        x = index * bar
        bars.append(
            f'<rect x="{x + 1:.1f}" y="{height - h:.1f}" width="{max(bar - 2, 1):.1f}" height="{h:.1f}" '
            f'fill="{color}"><title>{escape(label)}: {value:g}</title></rect>'
        )
    return mark_safe(
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
        f'width="100%" height="{height}" preserveAspectRatio="none" data-points="{len(points)}">'
        f"<title>{escape(title)}</title>"
        f'<text x="4" y="14" font-size="12" fill="#555">{escape(title)} (max {top:g})</text>' + "".join(bars) + "</svg>"
    )
