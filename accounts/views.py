"""The tenant dashboard's account pages: overview, tenant switching, API keys. Thin: the rules live
in ``accounts.dashboard`` and ``accounts.services``."""

import math
from datetime import UTC, datetime, timedelta
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from accounts import dashboard, quotas, services, signin
from accounts.forms import KeyForm, PrivacyForm
from accounts.models import Membership
from inference import privacy, selectors
from inference.charts import bar_chart


def _context(request, membership, **extra):
    return {
        "membership": membership,
        "tenant": membership.tenant,
        "memberships": dashboard.memberships(request.user),
        "can_manage": membership.role in dashboard.MANAGERS,
        **extra,
    }


def limit_sign_in(login_view):
    """Wrap a login view (the dashboard's, the admin's) with the failed sign-in limit (accounts.signin):
    a limited username or address gets 429 without its password being checked."""

    @wraps(login_view)
    def view(request, *args, **kwargs):
        if request.method != "POST":
            return login_view(request, *args, **kwargs)
        who = {"username": request.POST.get("username", ""), "address": request.META.get("REMOTE_ADDR", "")}
        try:
            wait = signin.refused_for(**who)
            if wait:
                minutes = math.ceil(wait / 60)
                message = (
                    f"Too many failed sign-in attempts; wait {minutes} minute{'s' if minutes != 1 else ''}"
                    " before trying again."
                )
                return _refused(request, message, status=429, retry_after=wait)
            response = login_view(request, *args, **kwargs)
            # Django's LoginView redirects when it signs someone in and shows the form again otherwise.
            if response.status_code == 200:
                signin.record_failure(**who)
            return response
        except signin.CounterUnavailable:
            return _refused(
                request, "Sign-in is unavailable for a moment; try again shortly.", status=503, retry_after=5
            )

    return view


def _refused(request, message: str, *, status: int, retry_after: int):
    response = render(request, "dashboard/signin_refused.html", {"message": message}, status=status)
    response["Retry-After"] = str(retry_after)
    return response


sign_in = limit_sign_in(auth_views.LoginView.as_view(template_name="dashboard/login.html"))


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


def _require_owner(membership) -> None:
    if membership.role != Membership.Role.OWNER:
        raise PermissionDenied("Only the tenant's owners change what is kept, export the log or delete queries.")


@login_required
def data_settings(request):
    """What the tenant keeps of its queries and for how long (owners change it), the export, and
    what deleting does."""
    membership = dashboard.current_membership(request)
    tenant = membership.tenant
    form = PrivacyForm(instance=tenant)
    saved = False
    if request.method == "POST":
        _require_owner(membership)
        form = PrivacyForm(request.POST, instance=tenant)
        if form.is_valid():
            form.save()
            saved = True
    return render(
        request,
        "dashboard/data.html",
        _context(
            request,
            membership,
            form=form,
            saved=saved,
            is_owner=membership.role == Membership.Role.OWNER,
            policy=privacy.tenant_policy(tenant),
            hold_seconds=int(settings.METADATA_HOLD_SECONDS),
        ),
    )


@login_required
@require_POST
def key_delete_queries(request, key_id):
    """Delete every query of a key: rows and stored images (owners); the usage figures stay."""
    membership = dashboard.current_membership(request)
    _require_owner(membership)
    api_key = dashboard.tenant_key(membership, key_id)
    counts = privacy.delete_queries(api_key_id=api_key.pk)
    messages.success(
        request, f"Deleted {counts['queries']} queries of {api_key.name} and {counts['objects']} stored images."
    )
    return redirect("dashboard:key", key_id=api_key.pk)
