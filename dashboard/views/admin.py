"""The operators' pages beside Django's admin: usage and spend across tenants, and a query's images."""

from datetime import UTC, datetime, timedelta

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpResponse
from django.shortcuts import render

from config import money
from dashboard import usage_charts
from dashboard.charts import bar_chart
from dashboard.views.common import image_response
from inference import selectors


@staff_member_required
def admin_query_image(request, query_id, position: int = 0):
    return image_response(query_id, position)


@staff_member_required
def admin_usage(request):
    """Usage across tenants from the daily rollups (never the query log), over a chosen range and
    broken down by key, model or endpoint, as on the tenants' overview."""
    today = datetime.now(UTC).date()
    view = usage_charts.parse(request.GET, today=today)
    data = selectors.usage_breakdown(start=view.start, end=view.end, by=view.by, top=8)
    tenants = selectors.usage_by_tenant(view.start, view.end)
    per_tenant = [
        (
            t,
            bar_chart(
                [
                    (p["date"], p["requests"])
                    for p in selectors.usage_series(view.start, tenant_id=t["tenant"].pk, until=view.end)
                ],
                title=f"{t['tenant'].name}: requests per day",
                height=60,
            ),
        )
        for t in [t for t in tenants if t["tenant"] is not None][:10]
    ]
    return render(
        request,
        "admin/usage.html",
        {
            **admin.site.each_context(request),
            "title": f"Usage, {view.description}",
            "view": view,
            "presets": usage_charts.PRESETS,
            "breakdowns": usage_charts.BREAKDOWN_NAMES,
            "data": data,
            "charts": usage_charts.breakdown_charts(data, scope="all tenants"),
            "tenants": tenants,
            "per_tenant": per_tenant,
            "top_keys": selectors.top_keys(view.start, tenant_id=None, until=view.end),
        },
        status=400 if view.errors else 200,
    )


def spend_range(params) -> tuple:
    """(since, until, days, custom) from ``?days=7|30|90`` (or any 1..366) or ``?from=&to=``
    (ISO dates, at most 366 days apart); 30 days by default. A malformed range falls back to 30
    days and says so."""
    from datetime import date

    today = datetime.now(UTC).date()
    error = ""
    if params.get("from") or params.get("to"):
        try:
            since = date.fromisoformat(params.get("from") or "")
            until = date.fromisoformat(params.get("to") or "") if params.get("to") else today
            if until < since or (until - since).days > 365:
                raise ValueError
            return since, until, (until - since).days + 1, True, ""
        except ValueError:
            error = "The custom range must be two dates (from before to), at most 366 days apart; showing 30 days."
    try:
        days = max(1, min(int(params.get("days", 30)), 366))
    except ValueError:
        days = 30
    return today - timedelta(days=days - 1), today, days, False, error


@staff_member_required
def admin_spend(request):
    """Spend across tenants, keys and models from the daily rollups, with budgets (the tenants at
    80 % or more of theirs first) and every model's price history."""
    from django.conf import settings

    since, until, days, custom, error = spend_range(request.GET)
    series = selectors.spend_series(since, until)
    tenants = selectors.spend_by_tenant(since, until)
    currency = settings.CURRENCY
    charts = [
        bar_chart(
            [(str(p["date"]), float(p["spend"])) for p in series],
            title=f"Spend per day, all tenants ({currency})",
            color="#2a7d2a",
        )
    ]
    per_tenant = [
        (
            t,
            bar_chart(
                [(str(p["date"]), float(p["spend"])) for p in selectors.spend_series(since, until, t["tenant"].pk)],
                title=f"{t['tenant'].name}: spend per day ({currency})",
                color="#2a7d2a",
                height=80,
            ),
        )
        for t in [t for t in tenants if t["tenant"] is not None and t["spend"] > 0][:10]
    ]
    return render(
        request,
        "admin/spend.html",
        {
            **admin.site.each_context(request),
            "title": f"Spend, {since} to {until}",
            "since": since,
            "until": until,
            "days": days,
            "custom": custom,
            "range_error": error,
            "currency": currency,
            "total": sum((p["spend"] for p in series), money.ZERO),
            "charts": charts,
            "tenants": tenants,
            "per_tenant": per_tenant,
            "keys": selectors.spend_by_key(since, until),
            "models": selectors.spend_by_model(since, until),
            "prices": selectors.price_history(),
        },
    )


@staff_member_required
def admin_spend_csv(request):
    """Spend per tenant and UTC month, for invoicing: one row per tenant and month, from the rollups."""
    import csv

    from django.conf import settings

    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="spend-per-tenant-month.csv"'
    writer = csv.writer(response)
    writer.writerow(
        [
            "month",
            "tenant",
            "tenant_name",
            "currency",
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "spend",
            "budget",
        ]
    )
    for row in selectors.spend_by_month():
        budget = row["tenant__monthly_budget"]
        writer.writerow(
            [
                row["month"].strftime("%Y-%m"),
                row["tenant__slug"] or "(deleted)",
                _csv_text(row["tenant__name"] or "(deleted tenant, anonymised)"),
                settings.CURRENCY,
                row["requests"],
                row["prompt_tokens"],
                row["completion_tokens"],
                money.text(row["spend"]),
                "" if budget is None else money.text(budget),
            ]
        )
    return response


def _csv_text(value: str) -> str:
    """A spreadsheet must not read a name as a formula."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value
