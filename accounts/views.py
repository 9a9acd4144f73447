"""The tenant dashboard's account pages: overview, tenant switching, API keys. Thin: the rules live
in ``accounts.dashboard`` and ``accounts.services``."""

from datetime import UTC, datetime, timedelta

from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from accounts import dashboard, quotas, services
from accounts.forms import KeyForm
from inference import selectors
from inference.charts import bar_chart


def _context(request, membership, **extra):
    return {
        "membership": membership,
        "tenant": membership.tenant,
        "memberships": dashboard.memberships(request.user),
        "can_manage": membership.role in dashboard.MANAGERS,
        **extra,
    }


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
        _context(
            request,
            membership,
            month=month,
            day=day,
            limits=limits,
            charts=charts,
            top_keys=selectors.top_keys(today - timedelta(days=29), tenant_id=tenant.pk),
        ),
    )


@login_required
@require_POST
def switch(request):
    dashboard.switch_tenant(request, request.POST.get("tenant"))
    return redirect("dashboard:overview")


@login_required
def key_list(request):
    membership = dashboard.current_membership(request)
    new_key = None
    form = KeyForm(tenant=membership.tenant)
    if request.method == "POST":
        dashboard.require_manager(membership)
        form = KeyForm(request.POST, tenant=membership.tenant)
        if form.is_valid():
            overrides = {name: form.cleaned_data[name] for name in form.Meta.fields if name != "name"}
            _, new_key = services.create_api_key(
                membership.tenant, form.cleaned_data["name"], created_by=request.user, **overrides
            )
            form = KeyForm(tenant=membership.tenant)
    api_keys = membership.tenant.api_keys.exclude(name__startswith="playground: ").order_by("-created_at")
    rows = []
    for api_key in api_keys:
        limits, snap = quotas.snapshot(api_key)
        rows.append({"key": api_key, "limits": limits, "snap": snap, "expired": api_key.is_expired()})
    return render(
        request,
        "dashboard/keys.html",
        _context(
            request,
            membership,
            form=form,
            new_key=new_key,
            rows=rows,
        ),
        status=201 if new_key else 200,
    )


@login_required
def key_detail(request, key_id):
    membership = dashboard.current_membership(request)
    api_key = dashboard.tenant_key(membership, key_id)
    form = KeyForm(instance=api_key, tenant=membership.tenant)
    if request.method == "POST":
        dashboard.require_manager(membership)
        form = KeyForm(request.POST, instance=api_key, tenant=membership.tenant)
        if form.is_valid():
            form.save()
            return redirect("dashboard:keys")
    return render(request, "dashboard/key_detail.html", _context(request, membership, api_key=api_key, form=form))


@login_required
@require_POST
def key_revoke(request, key_id):
    membership = dashboard.current_membership(request)
    dashboard.require_manager(membership)
    services.revoke_api_key(dashboard.tenant_key(membership, key_id))
    return redirect("dashboard:keys")
