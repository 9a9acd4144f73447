"""The query log and a query's detail: a tenant only ever reaches its own rows (anything else is 404)."""

from datetime import datetime

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render

from accounts import dashboard
from dashboard.views.common import image_response, page_context
from inference import chat, privacy, selectors, services
from inference.models import Query

PAGE_SIZE = 50


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
        page_context(
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
        page_context(
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
    return image_response(query_id, position, tenant_id=membership.tenant_id)
