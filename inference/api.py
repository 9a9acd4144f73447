"""The REST API. Views stay thin: parse, call a service, render."""

from django.conf import settings
from django.http import QueryDict
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from config import money
from config.errors import ApiError
from inference import chat, health, selectors, serializers, services, validation
from inference.dispatch import get_dispatcher
from inference.models import Query
from inference.parsers import JSONObjectParser

_ERROR_DESCRIPTIONS = {
    400: "invalid_request, unsupported_parameter or invalid_image: the message names the field",
    401: "unauthorized, key_revoked or key_expired",
    403: "forbidden",
    404: "not_found or model_not_found",
    413: "image_too_large (bytes or pixels) or payload_too_large",
    415: "unsupported_media_type: send application/json (or multipart/form-data where documented)",
    429: "rate_limited, quota_exceeded or budget_exceeded (with Retry-After)",
    500: "internal_error (logged with the request id)",
    502: "engine_error",
    503: "model_unavailable, worker_lost or service_unavailable",
    504: "timeout: the query goes on; poll it",
    507: "gpu_oom",
}


def errors(*statuses: int, style: str = "sightline") -> dict:
    """The documented error answers of an operation, in its endpoint family's shape."""
    body = serializers.OpenAIErrorSerializer if style == "openai" else serializers.ErrorSerializer
    return {status: OpenApiResponse(body, description=_ERROR_DESCRIPTIONS[status]) for status in statuses}


# Every keyed operation: a bad key, Redis or the database unreachable, an unexpected failure.
KEYED = (401, 500, 503)
# An operation that admits a query: its input, its size, its quotas (and its model's errors).
SUBMITS = (*KEYED, 400, 413, 415, 429)
# A tiny valid PNG (8x8), so that the schema's examples are requests that work.
EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGM8ISfHgA0wYRUdtBIA0MoBFD5jqJkAAAAASUVORK5CYII="


class KeyedAPIView(APIView):
    """A view authenticated by an API key. Every answer carries the key's x-ratelimit-* headers
    (from its admission when it made one, else from its current counters)."""

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        from accounts import quotas
        from accounts.models import ApiKey

        api_key = getattr(request, "_auth", None)  # as authenticated; never authenticate again here
        if isinstance(api_key, ApiKey) and "x-ratelimit-limit-requests" not in response:
            try:
                limits, snap = quotas.snapshot(api_key)
                for name, value in quotas.headers(limits, snap, quotas.now()).items():
                    response[name] = value
            except Exception:  # noqa: BLE001 - headers are a courtesy; never fail an answer for them
                pass
        return response


def client_info(request) -> services.ClientInfo:
    return services.ClientInfo(
        ip=request.META.get("REMOTE_ADDR") or None, user_agent=request.META.get("HTTP_USER_AGENT", "")
    )


def with_rate_headers(response, query: Query):
    for name, value in getattr(query, "rate_limit_headers", {}).items():
        response[name] = value
    return response


# The fields of /v1/glm/infer (JSON keys or form parts); any other is refused. /v1/queries also
# takes a conversation (``messages``, JSON) in place of ``prompt`` and ``image``.
INFER_FIELDS = ("image", "prompt", "max_tokens", "temperature", "top_p", "enable_thinking", "model")
QUERY_FIELDS = (*INFER_FIELDS, "messages")


def _thinking(data) -> bool:
    """``enable_thinking``: a JSON boolean, or a form's "true"/"false"; off unless asked (the
    ``result`` of these endpoints is the answer alone; the reasoning has its own field)."""
    value = data.get("enable_thinking")
    if isinstance(data, QueryDict) and value is not None:
        if value not in ("true", "false"):
            raise validation.refuse("enable_thinking", "'enable_thinking' must be true or false.")
        value = value == "true"
    return validation.boolean(value, "enable_thinking", default=settings.GLM_INFER_THINKING_DEFAULT)


def submit_from(request, endpoint: str, *, fields: tuple[str, ...] = INFER_FIELDS) -> Query:
    """Admit the request's query (multipart or JSON) through the shared admission path."""
    data = request.data
    validation.refuse_unknown(data, fields, endpoint=request.path)
    numbers = {name: data.get(name) for name in ("max_tokens", "temperature", "top_p")}
    if isinstance(data, QueryDict):  # a form's numbers are text; JSON's must be JSON numbers
        numbers = {name: validation.form_number(value, name) for name, value in numbers.items()}
    conversation = chat.conversation_from(data)
    return services.submit(
        request.auth,
        endpoint=endpoint,
        client=client_info(request),
        model=data.get("model"),
        extra_params={"enable_thinking": _thinking(data)},
        **conversation,
        **numbers,
    )


class GlmInferView(KeyedAPIView):
    """``POST /v1/glm/infer``: an image and a question in, the answer out (the original wrapper's shape)."""

    parser_classes = [MultiPartParser, FormParser, JSONObjectParser]

    @extend_schema(
        operation_id="glm_infer",
        summary="Ask a question, about 0..MAX_IMAGES_PER_REQUEST images",
        description=(
            "Send `multipart/form-data` with a `prompt` and `image` files (repeat the part for several), or "
            "`application/json` with `image` as base64 or a data URI, or a list of them. The image is optional: "
            "the model answers text-only questions too. The model sees the images in order, then the prompt, "
            "in one user message. Waits for the answer (at most SYNC_TIMEOUT seconds; past it, "
            "504 `timeout` with the `query_id`, and the query goes on). Any other field is refused with 400 "
            "`unsupported_parameter`."
        ),
        request={
            "multipart/form-data": serializers.InferMultipartSerializer,
            "application/json": serializers.InferJsonSerializer,
        },
        responses={200: serializers.InferResultSerializer, **errors(*SUBMITS, 404, 504, 507)},
        examples=[
            OpenApiExample(
                "JSON",
                value={
                    "image": "data:image/png;base64," + EXAMPLE_PNG,
                    "prompt": "What is in this picture?",
                    "max_tokens": 16,
                },
                request_only=True,
                media_type="application/json",
            ),
            OpenApiExample(
                "JSON, two images",
                value={
                    "image": [EXAMPLE_PNG, "data:image/png;base64," + EXAMPLE_PNG],
                    "prompt": "What differs between these pictures?",
                    "max_tokens": 16,
                },
                request_only=True,
                media_type="application/json",
            ),
            OpenApiExample(
                "JSON, text only",
                value={"prompt": "Say hello.", "max_tokens": 16},
                request_only=True,
                media_type="application/json",
            ),
        ],
        tags=["inference"],
    )
    def post(self, request):
        query = submit_from(request, Query.Endpoint.GLM_INFER)
        done = services.run_sync_or_raise(query)
        body = {
            "result": done.answer,
            "reasoning": done.reasoning,
            "code": 0,
            "cost_time": round(done.total_seconds or 0.0, 3),
            "query_id": str(done.pk),
            "usage": services.usage(done),
        }
        return with_rate_headers(Response(body), query)


class HealthView(APIView):
    """``GET /health``: liveness, and whether the model is loaded."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(operation_id="health", responses={200: serializers.HealthSerializer}, tags=["health"])
    def get(self, request):
        status = get_dispatcher().status()
        return Response(
            {
                "status": "ok",
                "model_loaded": status["model_loaded"],
                "mode": status["mode"],
                "model": settings.INFERENCE_MODEL_NAME,
                "models": services.served_models(),
            }
        )


class ReadyView(APIView):
    """``GET /health/ready``: 200 when the database, Redis and a worker with its model are there, else 503."""

    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="health_ready",
        parameters=[
            OpenApiParameter(
                "model", str, description="Ready for this model only (default: every served model needs a worker)."
            )
        ],
        responses={200: serializers.ReadySerializer, 503: serializers.ReadySerializer, **errors(404)},
    )
    def get(self, request):
        ready, body = health.readiness(request.query_params.get("model") or None)
        return Response(body, status=200 if ready else 503)


class QueryPagination(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 20
    page_size_query_param = "limit"
    max_page_size = 100

    def get_page_size(self, request):
        # DRF silently falls back to the default for a bad ?limit=; the schema says 1..100, so say so.
        value = request.query_params.get(self.page_size_query_param)
        if value is None:
            return self.page_size
        if not value.isdigit() or not 1 <= int(value) <= self.max_page_size:
            raise ApiError("invalid_request", f"'limit' must be a whole number from 1 to {self.max_page_size}.")
        return int(value)


def query_list_filters(params) -> dict:
    """``GET /v1/queries``' filters (model, status, endpoint); a bad value is 400 naming it, never ignored."""
    filters = {}
    if "model" in params:
        model = params["model"]
        if not model or len(model) > 200:
            raise ApiError("invalid_request", "'model' must be a model name (1..200 characters).")
        filters["model"] = model
    for name, choices in (("status", Query.Status.values), ("endpoint", Query.Endpoint.values)):
        if name in params:
            if params[name] not in choices:
                raise ApiError("invalid_request", f"'{name}' must be one of: {', '.join(choices)}.")
            filters[name] = params[name]
    return filters


class QueryListView(KeyedAPIView):
    """``POST /v1/queries`` (an async job: 202, then poll) and ``GET /v1/queries`` (the tenant's, newest first)."""

    parser_classes = [MultiPartParser, FormParser, JSONObjectParser]

    @extend_schema(
        operation_id="queries_create",
        summary="Submit a query as an async job",
        description=(
            "The inputs of /v1/glm/infer (`prompt` and 0..MAX_IMAGES_PER_REQUEST `image`s), or, as JSON, "
            "`messages`: a conversation in the chat form of /v1/chat/completions (its images as `image_url` "
            "parts), never both. Answers 202 at once; poll `GET /v1/queries/{id}`."
        ),
        request={
            "multipart/form-data": serializers.InferMultipartSerializer,
            "application/json": serializers.QueryJsonSerializer,
        },
        responses={202: serializers.QueryAcceptedSerializer, **errors(*SUBMITS, 404)},
        examples=[
            OpenApiExample(
                "JSON",
                value={"image": EXAMPLE_PNG, "prompt": "What is in this picture?", "max_tokens": 16},
                request_only=True,
                media_type="application/json",
            ),
            OpenApiExample(
                "JSON, a conversation",
                value={
                    "messages": [
                        {"role": "system", "content": "Answer in one word."},
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + EXAMPLE_PNG}},
                                {"type": "text", "text": "Which colour is this?"},
                            ],
                        },
                    ],
                    "max_tokens": 16,
                },
                request_only=True,
                media_type="application/json",
            ),
        ],
        tags=["queries"],
    )
    def post(self, request):
        query = submit_from(request, Query.Endpoint.QUERIES, fields=QUERY_FIELDS)
        services.dispatch(query, queue_without_worker=True, stream=False)
        poll_url = request.build_absolute_uri(f"/v1/queries/{query.pk}")
        response = Response(
            {"id": str(query.pk), "object": "query", "status": query.status, "poll_url": poll_url}, status=202
        )
        response["Location"] = poll_url
        return with_rate_headers(response, query)

    @extend_schema(
        operation_id="queries_list",
        parameters=[
            OpenApiParameter("cursor", str, description="From a page's next or previous URL."),
            OpenApiParameter(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 100},
                description="Queries per page, 1..100 (default 20).",
            ),
            OpenApiParameter("model", str, description="Only this model's queries."),
            OpenApiParameter("status", {"type": "string", "enum": list(Query.Status.values)}),
            OpenApiParameter("endpoint", {"type": "string", "enum": list(Query.Endpoint.values)}),
        ],
        responses={200: serializers.QueryPageSerializer, **errors(*KEYED, 400, 404)},
        tags=["queries"],
    )
    def get(self, request):
        paginator = QueryPagination()
        queries = selectors.tenant_queries(request.auth.tenant_id)
        queries = queries.filter(**query_list_filters(request.query_params))
        queries = selectors.with_images(queries)  # one query for all images
        page = paginator.paginate_queryset(queries, request, view=self)
        return paginator.get_paginated_response(serializers.QuerySerializer(page, many=True).data)


def tenant_query_or_404(request, query_id) -> Query:
    query = selectors.tenant_query(request.auth.tenant_id, query_id)
    if query is None:
        raise ApiError("not_found", f"No query {query_id} for this key's tenant.")
    return query


class QueryDetailView(KeyedAPIView):
    """``GET /v1/queries/{id}``: status, answer, usage and timings. Another tenant's id is 404."""

    @extend_schema(
        operation_id="queries_retrieve",
        responses={200: serializers.QuerySerializer, **errors(*KEYED, 404)},
        tags=["queries"],
    )
    def get(self, request, query_id):
        query = tenant_query_or_404(request, query_id)
        return Response(serializers.QuerySerializer(query).data)


class QueryCancelView(KeyedAPIView):
    """``POST /v1/queries/{id}/cancel``: stop a queued or running query; it ends ``failed``/``cancelled``."""

    @extend_schema(
        operation_id="queries_cancel",
        request=None,
        responses={202: serializers.QuerySerializer, **errors(*KEYED, 404)},
        tags=["queries"],
    )
    def post(self, request, query_id):
        query = tenant_query_or_404(request, query_id)
        if not query.is_finished:
            services.cancel(query.pk)
        return Response(serializers.QuerySerializer(query).data, status=202)


class UsageView(KeyedAPIView):
    """``GET /v1/usage``: this key's counters against each quota, and its tenant's usage this month."""

    @extend_schema(operation_id="usage", responses={200: OpenApiTypes.OBJECT, **errors(*KEYED)}, tags=["usage"])
    def get(self, request):
        from datetime import UTC, datetime

        from accounts import quotas

        api_key = request.auth
        limits, snap = quotas.snapshot(api_key)
        today = datetime.now(UTC).date()
        month_start = today.replace(day=1)

        def quota(limit, used):
            return {"limit": limit, "used": used, "remaining": None if limit is None else max(0, limit - used)}

        def budget(limit, used_nano):
            # Money as decimal strings: settled spend plus what running queries hold (their worst case).
            used = money.from_nano(used_nano)
            remaining = None if limit is None else max(money.ZERO, money.quantized(limit) - used)
            return {"limit": money.text(limit), "used": money.text(used), "remaining": money.text(remaining)}

        def totals(*args):
            values = selectors.usage_totals(*args)
            return {**values, "spend": money.text(values["spend"])}

        return Response(
            {
                "currency": settings.CURRENCY,
                "key": {
                    "id": api_key.pk,
                    "name": api_key.name,
                    "quotas": {
                        "requests_per_minute": quota(limits.requests_per_minute, snap.requests_last_minute),
                        "requests_per_day": quota(limits.requests_per_day, snap.requests_today),
                        "tokens_per_month": quota(limits.tokens_per_month, snap.tokens_this_month),
                        "concurrent_requests": quota(limits.max_concurrent_requests, snap.concurrent),
                        "monthly_budget": budget(limits.key_budget, snap.spend_this_month),
                    },
                    "today": totals(api_key.tenant_id, today, api_key.pk),
                    "this_month": totals(api_key.tenant_id, month_start, api_key.pk),
                },
                "tenant": {
                    "slug": api_key.tenant.slug,
                    "monthly_budget": budget(limits.tenant_budget, snap.tenant_spend_this_month),
                    "today": totals(api_key.tenant_id, today),
                    "this_month": totals(api_key.tenant_id, month_start),
                },
            }
        )
