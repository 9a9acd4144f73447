"""The query log and a query's detail: a tenant only ever reaches its own rows (anything else is 404)."""

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import render

from accounts import dashboard
from dashboard.forms import QueryLogFilter, cursor
from dashboard.views.common import image_response, page_context
from inference import chat, privacy, selectors, services
from inference.models import Query

PAGE_SIZE = 50
SHOWN_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "n")


@login_required
def query_list(request):
    membership = dashboard.current_membership(request)
    tenant = membership.tenant
    api_keys = list(tenant.api_keys.order_by("name"))
    models = [m for m in services.served_models() if tenant.may_use(m)]  # the registry, not a DISTINCT over the log
    form = QueryLogFilter(request.GET, api_keys=api_keys, models=models)
    page, next_params, problems = [], None, []
    if form.is_valid():
        queries = selectors.tenant_queries(tenant.pk).defer("answer", "params", "messages").select_related("api_key")
        # keyset pagination: no OFFSET, no COUNT over millions of rows
        page = list(selectors.filter_log(queries, **form.log_filters())[: PAGE_SIZE + 1])
        if len(page) > PAGE_SIZE:
            page = page[:PAGE_SIZE]
            params = request.GET.copy()
            params["before"] = cursor(page[-1])
            next_params = params.urlencode()
        for query in page:
            query.content_shown = privacy.content_shown(query)
            query.kept = privacy.kept(query)
    else:
        problems = form.problems()
    filters = {name: request.GET.get(name, "") for name in form.fields}
    newest = request.GET.copy()
    newest.pop("before", None)
    model_choices = models if not filters["model"] or filters["model"] in models else [*models, filters["model"]]
    response = render(
        request,
        "dashboard/queries.html",
        page_context(
            request,
            membership,
            queries=page,
            filters=filters,
            problems=problems,
            paged=bool(filters["before"]),
            newest_params=newest.urlencode(),
            next_params=next_params,
            statuses=Query.Status.values,
            endpoints=Query.Endpoint.values,
            models=model_choices,
            api_keys=api_keys,
            policy=privacy.tenant_policy(tenant),
        ),
    )
    if problems:
        response.status_code = 400
    return response


@login_required
def query_detail(request, query_id):
    membership = dashboard.current_membership(request)
    query = selectors.tenant_query(membership.tenant_id, query_id, every_field=True)
    if query is None:
        raise Http404("No such query.")
    images = list(query.images.all())
    content_shown = privacy.content_shown(query)
    images_shown = privacy.images_shown(query)
    by_rank = {image.position: image for image in images}
    conversation = chat.turn_parts(query.messages) if content_shown else []
    for turn in conversation:
        for part in turn["parts"]:
            if part["type"] == "image":
                image = by_rank.get(part["rank"])
                part["image"] = image
                part["shown"] = bool(images_shown and image is not None and image.is_kept)
    return render(
        request,
        "dashboard/query_detail.html",
        page_context(
            request,
            membership,
            query=query,
            images=images,
            conversation=conversation,
            settings_used=_settings_used(query.params or {}),
            max_side=settings.MAX_IMAGE_SIDE,
            content_shown=content_shown,
            images_shown=images_shown,
            kept=privacy.kept(query),
        ),
    )


def _settings_used(params: dict) -> list[tuple[str, str]]:
    """The decoding values a query asked for, as the detail lists them (None: the model's default)."""
    shown = [(name, str(params[name])) for name in SHOWN_PARAMS if params.get(name) is not None]
    if "enable_thinking" in params:
        shown.append(("thinking", "on" if params["enable_thinking"] else "off"))
    return shown


@login_required
def query_image(request, query_id, position: int = 0):
    membership = dashboard.current_membership(request)
    return image_response(query_id, position, tenant_id=membership.tenant_id)
