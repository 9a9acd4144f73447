"""The operators' pages beside Django's admin: usage across tenants, and a query's images."""

from datetime import UTC, datetime, timedelta

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.shortcuts import render

from dashboard.charts import bar_chart
from dashboard.views.common import image_response
from inference import selectors


@staff_member_required
def admin_query_image(request, query_id, position: int = 0):
    return image_response(query_id, position)


@staff_member_required
def admin_usage(request):
    """Usage across tenants from the daily rollups (never the query log)."""
    try:
        days = max(1, min(int(request.GET.get("days", 30)), 366))
    except ValueError:
        days = 30
    since = datetime.now(UTC).date() - timedelta(days=days - 1)
    series = selectors.usage_series(since)
    tenants = selectors.usage_by_tenant(since)
    charts = [
        bar_chart([(str(p["date"]), p["requests"]) for p in series], title="Requests per day, all tenants"),
        bar_chart(
            [(str(p["date"]), p["tokens"]) for p in series], title="Tokens per day, all tenants", color="#79aec8"
        ),
        bar_chart(
            [(str(p["date"]), (p["failed"] / p["requests"] * 100) if p["requests"] else 0) for p in series],
            title="Error rate per day (%)",
            color="#ba2121",
        ),
    ]
    per_tenant = [
        (
            t,
            bar_chart(
                [(str(p["date"]), p["requests"]) for p in selectors.usage_series(since, tenant_id=t["tenant"].pk)],
                title=f"{t['tenant'].name}: requests per day",
                height=80,
            ),
        )
        for t in [t for t in tenants if t["tenant"] is not None][:10]
    ]
    return render(
        request,
        "admin/usage.html",
        {
            **admin.site.each_context(request),
            "title": f"Usage, last {days} days",
            "days": days,
            "charts": charts,
            "tenants": tenants,
            "per_tenant": per_tenant,
            "top_keys": selectors.top_keys(since),
        },
    )
