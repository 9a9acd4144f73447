"""API keys: list and create (the secret shown once), edit, revoke, delete a key's queries."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from accounts import dashboard, quotas, services
from accounts.forms import KeyForm
from dashboard.views.common import page_context, require_owner
from inference import privacy


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
        page_context(
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
    return render(request, "dashboard/key_detail.html", page_context(request, membership, api_key=api_key, form=form))


@login_required
@require_POST
def key_revoke(request, key_id):
    membership = dashboard.current_membership(request)
    dashboard.require_manager(membership)
    services.revoke_api_key(dashboard.tenant_key(membership, key_id))
    return redirect("dashboard:keys")


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
