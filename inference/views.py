"""``GET /metrics``: a plain Django view (Prometheus' text format, not DRF's content negotiation).
The consoles' pages live in the ``dashboard`` app."""

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.utils.crypto import constant_time_compare
from django.views.decorators.http import require_GET

from config.errors import ApiError, error_body
from inference import metrics as inference_metrics


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
