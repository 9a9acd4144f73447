"""The overview: this month against the quotas, and usage charts (from the rollups)."""

from datetime import UTC, datetime, timedelta

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from accounts import dashboard
from dashboard.charts import bar_chart
from dashboard.views.common import page_context
from inference import selectors


@login_required
def overview(request):
    membership = dashboard.current_membership(request)
    tenant = membership.tenant
    today = datetime.now(UTC).date()
    series = selectors.usage_series(today - timedelta(days=29), tenant_id=tenant.pk)
    month = selectors.usage_totals(tenant.pk, today.replace(day=1))
    day = selectors.usage_totals(tenant.pk, today)
    limits = [
        ("Requests per minute (per key)", tenant.requests_per_minute, None),
        ("Requests per day (per key)", tenant.requests_per_day, day["requests"]),
        ("Tokens per month (per key)", tenant.tokens_per_month, month["total_tokens"]),
        ("Concurrent requests (per key)", tenant.max_concurrent_requests, None),
    ]
    charts = [
        bar_chart([(str(p["date"]), p["requests"]) for p in series], title="Requests per day"),
        bar_chart([(str(p["date"]), p["tokens"]) for p in series], title="Tokens per day", color="#79aec8"),
    ]
    return render(
        request,
        "dashboard/overview.html",
        page_context(
            request,
            membership,
            month=month,
            day=day,
            limits=limits,
            charts=charts,
            top_keys=selectors.top_keys(today - timedelta(days=29), tenant_id=tenant.pk),
        ),
    )
