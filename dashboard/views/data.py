"""Data & privacy: what the tenant keeps and for how long, and the export of its query log."""

from datetime import UTC, datetime

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.handlers.asgi import ASGIRequest
from django.http import StreamingHttpResponse
from django.shortcuts import render
from django.urls import reverse

from accounts import dashboard
from accounts.forms import PrivacyForm
from accounts.models import Membership
from dashboard.views.common import page_context, require_owner
from inference import exports, privacy


@login_required
def data_settings(request):
    """What the tenant keeps of its queries and for how long (owners change it), the export, and
    what deleting does."""
    membership = dashboard.current_membership(request)
    tenant = membership.tenant
    form = PrivacyForm(instance=tenant)
    saved = False
    if request.method == "POST":
        require_owner(membership)
        form = PrivacyForm(request.POST, instance=tenant)
        if form.is_valid():
            form.save()
            saved = True
    return render(
        request,
        "dashboard/data.html",
        page_context(
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
def query_export(request):
    """The tenant's query log as JSON Lines (owners only), streamed; each kept image linked."""
    membership = dashboard.current_membership(request)
    require_owner(membership, doing="export its query log")

    def image_url(query, position):
        return request.build_absolute_uri(reverse("dashboard:query-image-at", args=[query.pk, position]))

    key = request.GET.get("key", "")
    api_key_id = int(key) if key.isdigit() else None
    # Under ASGI an asynchronous iterator, so that each page goes out as it is read.
    pages = exports.apages if isinstance(request, ASGIRequest) else exports.pages
    response = StreamingHttpResponse(
        pages(membership.tenant_id, image_url, api_key_id=api_key_id), content_type="application/x-ndjson"
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    response["Content-Disposition"] = f'attachment; filename="{membership.tenant.slug}-queries-{stamp}.jsonl"'
    response["Cache-Control"] = "no-store"
    return response
