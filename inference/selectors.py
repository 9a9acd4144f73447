"""Queries that read the query log. Tenants only ever see their own rows."""

import uuid

from inference.models import Query

LIST_FIELDS = (
    "id",
    "tenant_id",
    "api_key_id",
    "model",
    "endpoint",
    "status",
    "prompt",
    "params",
    "image_sha256",
    "image_format",
    "image_width",
    "image_height",
    "image_bytes",
    "answer",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "error_code",
    "error_message",
    "created_at",
    "started_at",
    "first_token_at",
    "finished_at",
)


def tenant_queries(tenant_id):
    """The tenant's queries, newest first, without the image (it lives in its own table)."""
    return Query.objects.filter(tenant_id=tenant_id).only(*LIST_FIELDS).order_by("-created_at", "-id")


def tenant_query(tenant_id, query_id) -> Query | None:
    try:
        query_uuid = uuid.UUID(str(query_id))
    except ValueError:
        return None
    return tenant_queries(tenant_id).filter(pk=query_uuid).first()


def usage_totals(tenant_id, since, api_key_id=None) -> dict:
    """Sums of the daily rollups from ``since`` (a date) on, for a tenant or one of its keys."""
    from django.db.models import Sum

    from inference.models import UsageDaily

    rows = UsageDaily.objects.filter(tenant_id=tenant_id, date__gte=since)
    if api_key_id is not None:
        rows = rows.filter(api_key_id=api_key_id)
    totals = rows.aggregate(
        requests=Sum("requests"),
        succeeded=Sum("succeeded"),
        failed=Sum("failed"),
        rejected=Sum("rejected"),
        prompt_tokens=Sum("prompt_tokens"),
        completion_tokens=Sum("completion_tokens"),
    )
    totals = {name: value or 0 for name, value in totals.items()}
    totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    return totals
