"""The operators' pages beside Django's admin: usage across tenants, and a query's images."""

from datetime import UTC, datetime

from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.shortcuts import render

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
