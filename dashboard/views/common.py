"""What every dashboard page shares: its context, the owner rule, and streaming a query's image
(the dashboard's and the admin's image views: the tenant is checked before storage is asked)."""

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, Http404, HttpResponse, HttpResponseRedirect

from accounts import dashboard
from accounts.models import Membership
from inference import imagestore, selectors


def page_context(request, membership, *, budget: dict | None = None, **extra):
    """``budget``: the tenant's ``selectors.budget_status`` when the page read it already (the
    banner then reuses it instead of reading the spend again); it is in the context as ``budget``."""
    context = {
        "membership": membership,
        "tenant": membership.tenant,
        "memberships": dashboard.memberships(request.user),
        "can_manage": membership.role in dashboard.MANAGERS,
        "budget_banner": budget_banner(membership.tenant, status=budget),
        **extra,
    }
    if budget is not None:
        context["budget"] = budget
    return context


def budget_banner(tenant, *, status: dict | None = None) -> dict | None:
    """The banner every dashboard page shows at 80 % and at 100 % of this month's budget (the
    tenant's, or else the most spent of its keys'); None below 80 % or without a budget.
    ``status``: the tenant's budget_status, when the caller has it."""
    if status is None:
        if tenant.monthly_budget is None and not tenant.api_keys.filter(monthly_budget__isnull=False).exists():
            return None  # no budget anywhere: no query for the spend
        status = selectors.budget_status(tenant)
    candidates = [(status, "tenant")] + [(entry, "key") for entry in status["keys"] if not entry["key"].is_revoked]
    levelled = [(entry, whose) for entry, whose in candidates if entry["level"]]
    if not levelled:
        return None
    entry, whose = max(levelled, key=lambda item: item[0]["fraction"])
    percent = int(entry["fraction"] * 100)
    what = "this month's budget" if whose == "tenant" else f"this month's budget of the key {entry['key'].name}"
    figures = f"{entry['spent']:.2f} of {entry['budget']:.2f} {status['currency']}"
    if entry["level"] == "over":
        text = (
            f"100% of {what} is spent ({figures}): requests are refused with budget_exceeded until next "
            "month; raise the budget to go on."
        )
    else:
        text = f"80% of {what} is spent: {percent}% so far ({figures}, {entry['left']:.2f} left)."
    return {"level": entry["level"], "text": text}


def require_owner(membership, *, doing: str = "change what is kept, export the log or delete queries") -> None:
    if membership.role != Membership.Role.OWNER:
        raise PermissionDenied(f"Only the tenant's owners {doing}.")


def image_response(query_id, position: int = 0, tenant_id=None) -> HttpResponse:
    """The stored (normalised) image at ``position`` of a query: streamed from image storage, or a
    redirect to a short-lived signed URL of it (a bucket, IMAGE_S3_SERVE=redirect). 404 when there
    is none, when it is not kept, or (with ``tenant_id``) when the query is another tenant's: the
    tenant is checked before storage is asked anything."""
    image = selectors.query_image(query_id, position, tenant_id=tenant_id)
    if image is None:
        raise Http404("No such image.")
    if not image.key:  # not kept, or a row of the previous release not moved to storage yet
        try:
            return private(HttpResponse(selectors.image_bytes(image), content_type=image.content_type))
        except selectors.ImageNotKept:
            raise Http404("This image is not kept (the tenant's privacy mode or retention).") from None
    if imagestore.is_remote() and settings.IMAGE_S3_SERVE == "redirect":
        response = HttpResponseRedirect(imagestore.url(image.key))
        response["Cache-Control"] = "no-store"  # the signed URL expires soon: never cache the redirect
        return response
    try:
        stored = imagestore.store().open(image.key, "rb")
    except FileNotFoundError:
        raise Http404("This image is not in storage.") from None
    return private(FileResponse(stored, content_type=image.content_type))


def private(response: HttpResponse) -> HttpResponse:
    response["Cache-Control"] = "private, max-age=3600"
    return response
