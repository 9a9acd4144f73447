"""API keys: list (with each key's use and spend this month, what is left of its budget, and a
sparkline of the last 30 days, from the rollups) and create (the secret shown once, with examples
of calling the API with it), edit, revoke (after a confirmation page), delete a key's queries."""

from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from accounts import dashboard, quotas, services
from accounts.forms import KeyForm
from config import money
from dashboard import charts, examples
from dashboard.views.common import page_context, require_owner
from inference import privacy, selectors
from inference import services as inference_services

SPARKLINE_DAYS = 30


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
    today = datetime.now(UTC).date()  # the rollups' days are UTC days
    month_start, first_day = today.replace(day=1), today - timedelta(days=SPARKLINE_DAYS - 1)
    usage = selectors.usage_per_key_and_day(membership.tenant_id, min(month_start, first_day))
    # What is left of each budgeted key's monthly budget (the same figures as the banner's).
    budget = selectors.budget_status(membership.tenant)
    budgets = {entry["key"].pk: entry for entry in budget["keys"]}
    days = [first_day + timedelta(days=n) for n in range(SPARKLINE_DAYS)]
    rows = []
    for api_key in api_keys:
        limits, snap = quotas.snapshot(api_key)
        per_day = usage.get(api_key.pk, {})
        month = [counts for day, counts in per_day.items() if day >= month_start]
        requests = [per_day.get(day, {}).get("requests", 0) for day in days]
        rows.append(
            {
                "key": api_key,
                "limits": limits,
                "snap": snap,
                "expired": api_key.is_expired(),
                "month_requests": sum(c["requests"] for c in month),
                "month_tokens": sum(c["tokens"] for c in month),
                "month_spend": sum((c["spend"] for c in month), money.ZERO),
                "budget": budgets.get(api_key.pk),
                "sparkline": charts.sparkline(
                    requests,
                    title=f"{api_key.name}: {sum(requests):,} requests in the last {SPARKLINE_DAYS} days, "
                    f"at most {max(requests):,} a day",
                ),
            }
        )
    context = page_context(
        request, membership, budget=budget, form=form, new_key=new_key, rows=rows, currency=settings.CURRENCY
    )
    if new_key:
        models = inference_services.served_models()
        context["examples"] = examples.examples(
            base_url=request.build_absolute_uri("/").rstrip("/"), key=new_key, model=models[0] if models else ""
        )
    return render(request, "dashboard/keys.html", context, status=201 if new_key else 200)


@login_required
def key_detail(request, key_id):
    membership = dashboard.current_membership(request)
    api_key = dashboard.tenant_key(membership, key_id)
    form = KeyForm(instance=api_key, tenant=membership.tenant)
    if request.method == "POST":
        dashboard.require_manager(membership)
        form = KeyForm(request.POST, instance=dashboard.tenant_key(membership, key_id), tenant=membership.tenant)
        if form.is_valid():
            changes = {name: form.cleaned_data[name] for name in form.changed_data}
            services.edit_api_key(api_key=api_key, actor=request.user, changes=changes)
            return redirect("dashboard:keys")
    return render(request, "dashboard/key_detail.html", page_context(request, membership, api_key=api_key, form=form))


@login_required
def key_revoke(request, key_id):
    """GET: the confirmation page; POST: revoke (owners and admins)."""
    membership = dashboard.current_membership(request)
    dashboard.require_manager(membership)
    api_key = dashboard.tenant_key(membership, key_id)
    if request.method == "POST":
        services.revoke_api_key(api_key, actor=request.user)
        messages.success(request, f"Revoked {api_key.name}: requests with it now fail with key_revoked.")
        return redirect("dashboard:keys")
    return render(request, "dashboard/key_revoke.html", page_context(request, membership, api_key=api_key))


@login_required
@require_POST
def key_delete_queries(request, key_id):
    """Delete every query of a key: rows and stored images (owners); the usage figures stay."""
    membership = dashboard.current_membership(request)
    require_owner(membership)
    api_key = dashboard.tenant_key(membership, key_id)
    counts = privacy.delete_queries(api_key_id=api_key.pk)
    messages.success(
        request, f"Deleted {counts['queries']} queries of {api_key.name} and {counts['objects']} stored images."
    )
    return redirect("dashboard:key", key_id=api_key.pk)
