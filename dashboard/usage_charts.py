"""What the overview and the admin's usage page share: the range and breakdown a page asks for
(``?range=7|30|90`` or ``?from=YYYY-MM-DD&to=YYYY-MM-DD``, ``?by=key|model|endpoint``), read with
clear messages for bad input, and the charts of a usage breakdown (``selectors.usage_breakdown``)."""

from dataclasses import dataclass, field
from datetime import date, timedelta

from dashboard import charts

PRESETS = (7, 30, 90)
DEFAULT_DAYS = 30
MAX_DAYS = 366
BREAKDOWN_NAMES = {"key": "key", "model": "model", "endpoint": "endpoint"}
DEFAULT_BREAKDOWN = "key"


@dataclass(frozen=True)
class UsageView:
    """The days (UTC, both ends included) and breakdown a page shows, and what was wrong with the
    request's parameters (each a sentence; the defaults are shown instead)."""

    start: date
    end: date
    by: str = DEFAULT_BREAKDOWN
    preset: int | None = DEFAULT_DAYS
    errors: list[str] = field(default_factory=list)

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    @property
    def description(self) -> str:
        if self.preset:
            return f"last {self.preset} days"
        return f"{self.start.isoformat()} to {self.end.isoformat()}"


def _date(text: str, name: str, errors: list[str]) -> date | None:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        errors.append(f"“{text[:40]}” is not a date for “{name}”: write it as YYYY-MM-DD, e.g. 2026-01-31.")
        return None


def parse(params, *, today: date) -> UsageView:
    """The range and breakdown of ``params`` (a QueryDict). Bad input never raises: each problem is
    a message in ``errors``, and the default (the last 30 days by key) stands in for what was wrong."""
    errors: list[str] = []
    by = params.get("by", DEFAULT_BREAKDOWN) or DEFAULT_BREAKDOWN
    if by not in BREAKDOWN_NAMES:
        errors.append(f"“{by[:40]}” is not a breakdown: choose key, model or endpoint.")
        by = DEFAULT_BREAKDOWN
    chosen = params.get("range") or params.get("days") or ""
    start_text, end_text = params.get("from", "").strip(), params.get("to", "").strip()

    def preset(days: int, preset_errors=()) -> UsageView:
        return UsageView(today - timedelta(days=days - 1), today, by, days, [*errors, *preset_errors])

    if chosen.isdigit() and int(chosen) in PRESETS:
        return preset(int(chosen))
    if chosen not in ("", "custom"):
        return preset(DEFAULT_DAYS, [f"“{chosen[:40]}” is not a range: choose 7, 30 or 90 days, or dates from and to."])
    if not chosen and not (start_text or end_text):
        return preset(DEFAULT_DAYS)
    if not start_text or not end_text:
        return preset(DEFAULT_DAYS, ["A custom range needs both dates, from and to (YYYY-MM-DD)."])
    start, end = _date(start_text, "from", errors), _date(end_text, "to", errors)
    if start is None or end is None:
        return preset(DEFAULT_DAYS)
    if start > end:
        return preset(DEFAULT_DAYS, [f"The range starts ({start}) after it ends ({end}): swap the dates."])
    if end > today:
        return preset(DEFAULT_DAYS, [f"The range ends in the future ({end}); today is {today} (UTC)."])
    if (end - start).days + 1 > MAX_DAYS:
        return preset(DEFAULT_DAYS, [f"A range is at most {MAX_DAYS} days; {start} to {end} is longer."])
    return UsageView(start, end, by, None, errors)


def _series(data: dict, figure: str) -> list[charts.Series]:
    return [
        (group["label"], [day[figure] for day in group["days"]], charts.color(n, str(group["value"])))
        for n, group in enumerate(data["groups"])
    ]


def breakdown_charts(data: dict, *, scope: str = "") -> list:
    """The charts of a usage breakdown: requests and tokens per day (stacked by group), the error
    rate per day (all, and per group), and the latency percentiles per day (p50, p95, p99)."""
    days, by = data["days"], data["by"]
    suffix = f", by {BREAKDOWN_NAMES[by]}" + (f", {scope}" if scope else "")
    error_rates = [("all", [day["error_rate"] for day in data["totals"]], "#222222")]
    if len(data["groups"]) > 1:
        error_rates += _series(data, "error_rate")
    latency = [
        (f"p{q}", [day[f"p{q}_ms"] for day in data["totals"]], colour)
        for q, colour in zip((50, 95, 99), ("#0072b2", "#e69f00", "#b8001f"), strict=True)
    ]
    return [
        charts.stacked_bar_chart(days, _series(data, "requests"), title=f"Requests per day{suffix}", unit="requests"),
        charts.stacked_bar_chart(days, _series(data, "tokens"), title=f"Tokens per day{suffix}", unit="tokens"),
        charts.line_chart(days, error_rates, title=f"Error rate per day{suffix}", fmt=charts.percent),
        charts.line_chart(
            days,
            latency,
            title="Latency per day, p50 / p95 / p99 (upper bound of the histogram's bucket)"
            + (f", {scope}" if scope else ""),
            fmt=charts.milliseconds,
        ),
    ]
