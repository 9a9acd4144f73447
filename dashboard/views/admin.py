"""The operators' pages beside Django's admin: usage and spend across tenants, and a query's images."""

from datetime import UTC, datetime

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


@staff_member_required
def admin_spend(request):
    """Spend across tenants, keys and models from the daily rollups, over a chosen range (the usage
    page's form, ``usage_charts.parse``) and broken down by tenant or by model; budgets (the tenants
    at 80 % or more of theirs first) and every model's price history."""
    from django.conf import settings

    today = datetime.now(UTC).date()
    view = usage_charts.parse(
        request.GET, today=today, breakdowns=usage_charts.SPEND_BREAKDOWNS, default_by=usage_charts.SPEND_DEFAULT
    )
    currency = settings.CURRENCY
    data = selectors.usage_breakdown(start=view.start, end=view.end, by=view.by, top=8, rank_by="spend")
    return render(
        request,
        "admin/spend.html",
        {
            **admin.site.each_context(request),
            "title": f"Spend, {view.description}",
            "view": view,
            "presets": usage_charts.PRESETS,
            "breakdowns": usage_charts.SPEND_BREAKDOWNS,
            "currency": currency,
            "data": data,
            "total": data["summary"]["spend"],
            "charts": [usage_charts.spend_chart(data, currency=currency, scope="all tenants")],
            "tenants": selectors.spend_by_tenant(view.start, view.end),
            "keys": selectors.spend_by_key(view.start, view.end),
            "models": selectors.spend_by_model(view.start, view.end),
            "prices": selectors.price_history(),
        },
        status=400 if view.errors else 200,
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
