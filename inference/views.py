"""The dashboard's query pages and playground, and the admin's usage page. Thin: reads come from
``inference.selectors``; a tenant only ever reaches its own rows (anything else is 404)."""

from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.handlers.asgi import ASGIRequest
from django.http import (
    FileResponse,
    Http404,
    HttpResponse,
    HttpResponseRedirect,
    JsonResponse,
    StreamingHttpResponse,
)
from django.shortcuts import render
from django.urls import reverse
from django.utils.crypto import constant_time_compare
from django.views.decorators.http import require_GET

from accounts import dashboard
from accounts.views import _context
from config.errors import ApiError, error_body
from inference import chat, exports, imagestore, privacy, selectors, services
from inference import metrics as inference_metrics
from inference.charts import bar_chart
from inference.models import Query

PAGE_SIZE = 50


def _image_response(query_id, position: int = 0, tenant_id=None) -> HttpResponse:
    """The stored (normalised) image at ``position`` of a query: streamed from image storage, or a
    redirect to a short-lived signed URL of it (a bucket, IMAGE_S3_SERVE=redirect). 404 when there
    is none, when it is not kept, or (with ``tenant_id``) when the query is another tenant's: the
    tenant is checked before storage is asked anything."""
    image = selectors.query_image(query_id, position, tenant_id=tenant_id)
    if image is None:
        raise Http404("No such image.")
    if not image.key:  # not kept, or a row of the previous release not moved to storage yet
        try:
            return _private(HttpResponse(selectors.image_bytes(image), content_type=image.content_type))
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
    return _private(FileResponse(stored, content_type=image.content_type))


def _private(response: HttpResponse) -> HttpResponse:
    response["Cache-Control"] = "private, max-age=3600"
    return response


@login_required
def query_list(request):
    membership = dashboard.current_membership(request)
    filters = {name: request.GET.get(name, "") for name in ("status", "endpoint", "model", "key", "before")}
    queries = (
        selectors.tenant_queries(membership.tenant_id).defer("answer", "params", "messages").select_related("api_key")
    )
    if filters["status"] in Query.Status.values:
        queries = queries.filter(status=filters["status"])
    if filters["endpoint"] in Query.Endpoint.values:
        queries = queries.filter(endpoint=filters["endpoint"])
    if filters["model"]:
        queries = queries.filter(model=filters["model"][:200])
    if filters["key"].isdigit():
        queries = queries.filter(api_key_id=int(filters["key"]))
    if filters["before"]:  # keyset pagination: no OFFSET, no COUNT over millions of rows
        try:
            queries = queries.filter(created_at__lt=datetime.fromisoformat(filters["before"]))
        except ValueError:
            pass
    page = list(queries[: PAGE_SIZE + 1])
    more = len(page) > PAGE_SIZE
    page = page[:PAGE_SIZE]
    for query in page:
        query.content_shown = privacy.content_shown(query)
        query.kept = privacy.kept(query)
    next_params = None
    if more:
        params = request.GET.copy()
        params["before"] = page[-1].created_at.isoformat()
        next_params = params.urlencode()
    return render(
        request,
        "dashboard/queries.html",
        _context(
            request,
            membership,
            queries=page,
            filters=filters,
            next_params=next_params,
            statuses=Query.Status.values,
            endpoints=Query.Endpoint.values,
            # the served models (the registry), not a SELECT DISTINCT over the tenant's log
            models=[m for m in services.served_models() if membership.tenant.may_use(m)],
            api_keys=membership.tenant.api_keys.order_by("name"),
            policy=privacy.tenant_policy(membership.tenant),
        ),
    )


@login_required
def query_detail(request, query_id):
    membership = dashboard.current_membership(request)
    query = selectors.tenant_query(membership.tenant_id, query_id)
    if query is None:
        raise Http404("No such query.")
    return render(
        request,
        "dashboard/query_detail.html",
        _context(
            request,
            membership,
            query=query,
            images=list(query.images.all()),
            turns=chat.turns(query.messages) if privacy.content_shown(query) else [],
            max_side=settings.MAX_IMAGE_SIDE,
            content_shown=privacy.content_shown(query),
            images_shown=privacy.images_shown(query),
            kept=privacy.kept(query),
        ),
    )


@login_required
def query_image(request, query_id, position: int = 0):
    membership = dashboard.current_membership(request)
    return _image_response(query_id, position, tenant_id=membership.tenant_id)


@login_required
def query_export(request):
    """The tenant's query log as JSON Lines (owners only), streamed; each kept image linked."""
    from accounts.models import Membership

    membership = dashboard.current_membership(request)
    if membership.role != Membership.Role.OWNER:
        raise PermissionDenied("Only the tenant's owners export its query log.")

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


@login_required
def playground(request):
    membership = dashboard.current_membership(request)
    return render(
        request,
        "dashboard/playground.html",
        _context(
            request, membership, tiny_model=services.serves_tiny_model(), max_images=settings.MAX_IMAGES_PER_REQUEST
        ),
    )


@require_GET
def metrics(request):
    """``GET /metrics`` (Prometheus). With METRICS_TOKEN set, only for `Authorization: Bearer` it."""
    token = settings.METRICS_TOKEN
    if token and not constant_time_compare(request.headers.get("Authorization", ""), f"Bearer {token}"):
        error = ApiError("unauthorized", "GET /metrics wants 'Authorization: Bearer <METRICS_TOKEN>'.")
        return JsonResponse(error_body(error), status=error.status, headers={"WWW-Authenticate": "Bearer"})
    # Tenants' names and traffic only for a scraper that holds the token; the open endpoint sums them.
    body, content_type = inference_metrics.render(request.headers.get("Accept"), per_tenant=bool(token))
    return HttpResponse(body, content_type=content_type)


@staff_member_required
def admin_query_image(request, query_id, position: int = 0):
    return _image_response(query_id, position)


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
