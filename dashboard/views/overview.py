"""The overview: this month against the quotas, and usage charts over a chosen range, broken down
by key, model or endpoint (all from the daily rollups, never the query log)."""

from datetime import UTC, datetime

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from accounts import dashboard, quotas
from dashboard import usage_charts
from dashboard.views.common import page_context
from inference import selectors


def quota_bar(used: int, limit: int | None) -> dict:
    """A progress bar's figures: what is used of a limit (None: unlimited)."""
    if limit is None:
        return {"used": used, "limit": None, "ratio": None, "percent": None}
    ratio = used / limit if limit else 1.0
    return {"used": used, "limit": limit, "ratio": ratio, "percent": min(100.0, ratio * 100)}


@login_required
def overview(request):
    membership = dashboard.current_membership(request)
    tenant = membership.tenant
    now = datetime.now(UTC)
    today = now.date()
    view = usage_charts.parse(request.GET, today=today)
    month = selectors.usage_totals(tenant.pk, today.replace(day=1))
    day = selectors.usage_totals(tenant.pk, today)
    per_key = selectors.usage_per_key(tenant.pk, month_start=today.replace(day=1), today=today)
    keys = []
    for api_key in tenant.api_keys.filter(revoked_at=None).order_by("name"):
        limits = quotas.Limits.of(api_key)
        used = per_key.get(api_key.pk, {"requests_today": 0, "tokens_month": 0, "requests_month": 0})
        keys.append(
            {
                "key": api_key,
                "requests_today": quota_bar(used["requests_today"], limits.requests_per_day),
                "tokens_month": quota_bar(used["tokens_month"], limits.tokens_per_month),
                "requests_month": used["requests_month"],
            }
        )
    data = selectors.usage_breakdown(start=view.start, end=view.end, by=view.by, tenant_id=tenant.pk)
    # SPEND (to come, from the `spend` column of the rollups): this month's spend against the
    # tenant's budget as a progress bar (``quota_bar(spend, budget)``), and a spend chart per day
    # in ``charts`` below. Nothing is shown until that data exists: ``spend`` stays None.
    spend = None
    return render(
        request,
        "dashboard/overview.html",
        page_context(
            request,
            membership,
            now=now,
            month=month,
            day=day,
            keys=keys,
            spend=spend,
            view=view,
            presets=usage_charts.PRESETS,
            breakdowns=usage_charts.BREAKDOWN_NAMES,
            data=data,
            charts=usage_charts.breakdown_charts(data),
        ),
        status=400 if view.errors else 200,
    )
