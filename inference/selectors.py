"""Queries that read the query log. Tenants only ever see their own rows."""

import uuid

from django.db.models import Prefetch

from inference import chat, imagestore
from inference.models import Query, QueryImage

LIST_FIELDS = (
    "id",
    "tenant_id",
    "api_key_id",
    "model",
    "endpoint",
    "status",
    "prompt",
    "messages",
    "params",
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
    "privacy_mode",
    "content_removed_at",
    "images_removed_at",
)
# What pages and the API show of a query's images (the image itself is in storage, under its key).
IMAGE_FIELDS = ("id", "query_id", "position", "sha256", "format", "size_bytes", "width", "height", "key")


def with_images(queries):
    """``queries`` with each one's images (without their content) in order, as ``query.images.all()``."""
    images = QueryImage.objects.only(*IMAGE_FIELDS).order_by("position")
    return queries.prefetch_related(Prefetch("images", queryset=images))


def tenant_queries(tenant_id):
    """The tenant's queries, newest first, without their images (they live in their own table)."""
    return Query.objects.filter(tenant_id=tenant_id).only(*LIST_FIELDS).order_by("-created_at", "-id")


def tenant_query(tenant_id, query_id, *, every_field: bool = False) -> Query | None:
    """One of the tenant's queries, with its images' facts (``with_images``); None if not theirs.
    ``every_field``: every column loaded at once (a detail page shows reasoning, tool calls, choices
    and reasoning tokens too, which the log's fields leave out)."""
    try:
        query_uuid = uuid.UUID(str(query_id))
    except ValueError:
        return None
    rows = Query.objects.filter(tenant_id=tenant_id) if every_field else tenant_queries(tenant_id)
    return with_images(rows.filter(pk=query_uuid)).first()


def filter_log(
    queries,
    *,
    status: str = "",
    endpoint: str = "",
    model: str = "",
    api_key_id: int | None = None,
    created_from=None,
    created_until=None,
    before: tuple | None = None,
):
    """The query log's filters on ``queries`` (ordered newest first, ``-created_at, -id``):
    ``created_from`` inclusive, ``created_until`` exclusive (datetimes), and the keyset cursor
    ``before`` = (created_at, id) of the last row of the previous page: the rows after it in that
    order. No OFFSET and no COUNT: each page reads its rows off the (tenant, -created_at) index."""
    if status:
        queries = queries.filter(status=status)
    if endpoint:
        queries = queries.filter(endpoint=endpoint)
    if model:
        queries = queries.filter(model=model)
    if api_key_id is not None:
        queries = queries.filter(api_key_id=api_key_id)
    if created_from is not None:
        queries = queries.filter(created_at__gte=created_from)
    if created_until is not None:
        queries = queries.filter(created_at__lt=created_until)
    if before is not None:
        created_at, query_id = before
        if query_id is None:  # a cursor of the previous release: a time alone
            queries = queries.filter(created_at__lt=created_at)
        else:
            queries = queries.filter(created_at__lte=created_at).exclude(created_at=created_at, id__gte=query_id)
    return queries


def query_image(query_id, position: int, tenant_id=None) -> QueryImage | None:
    """The image at ``position`` of a query, of ``tenant_id``'s when given (its key and type)."""
    images = QueryImage.objects.filter(query_id=query_id, position=position)
    if tenant_id is not None:
        images = images.filter(query__tenant_id=tenant_id)
    return images.only("key", "content_type").first()


class ImageNotKept(Exception):
    """An image the engine needs is not in storage any more."""


def image_bytes(image: QueryImage) -> bytes:
    """The normalised PNG of an image row: from storage, or, for a row a process of the previous
    release wrote during a rolling deploy (not moved yet), from the row itself."""
    if image.key:
        return imagestore.read(image.key)
    content = QueryImage.objects.filter(pk=image.pk).values_list("content", flat=True).first()
    if content is None:
        raise ImageNotKept(f"image {image.position} of query {image.query_id} is not kept")
    return bytes(content)


def conversation_of(query: Query) -> tuple[list, list[bytes]]:
    """What the engine is asked: the query's conversation in the chat template's form, and its
    normalised images (PNG bytes, read from image storage) in order, the k-th standing for the
    k-th ``{"type": "image"}`` part. A row written before conversations were stored asks its
    prompt about its images."""
    rows = query.images.only("id", "query_id", "position", "key").order_by("position")
    images = [image_bytes(image) for image in rows]
    messages = query.messages or chat.one_turn(query.prompt, len(images))
    return messages, images


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


def usage_series(since, tenant_id=None, api_key_id=None) -> list[dict]:
    """Per day from ``since`` to today (days without usage included): requests, tokens, failures."""
    from datetime import UTC, datetime, timedelta

    from django.db.models import Sum

    from inference.models import UsageDaily

    rows = UsageDaily.objects.filter(date__gte=since)
    if tenant_id is not None:
        rows = rows.filter(tenant_id=tenant_id)
    if api_key_id is not None:
        rows = rows.filter(api_key_id=api_key_id)
    by_day = {
        row["date"]: row
        for row in rows.values("date").annotate(
            requests=Sum("requests"),
            failed=Sum("failed"),
            rejected=Sum("rejected"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
        )
    }
    today = datetime.now(UTC).date()
    series, day = [], since
    while day <= today:
        row = by_day.get(day, {})
        tokens = (row.get("prompt_tokens") or 0) + (row.get("completion_tokens") or 0)
        series.append(
            {
                "date": day,
                "requests": row.get("requests") or 0,
                "failed": row.get("failed") or 0,
                "rejected": row.get("rejected") or 0,
                "tokens": tokens,
            }
        )
        day += timedelta(days=1)
    return series


def usage_by_tenant(since=None) -> list[dict]:
    """Per tenant from ``since`` (a date; None: all time): requests, outcomes, tokens, error rate, the
    summed latency histogram and its p50/p99, most requests first."""
    from inference.models import UsageDaily

    summed = ("requests", "succeeded", "failed", "rejected", "prompt_tokens", "completion_tokens", "latency_ms_total")
    tenants: dict = {}
    rows = UsageDaily.objects.all() if since is None else UsageDaily.objects.filter(date__gte=since)
    rows = rows.select_related("tenant").only("tenant__name", "tenant__slug", "latency_histogram", *summed)
    for row in rows.iterator(chunk_size=2000):
        entry = tenants.setdefault(
            row.tenant_id,
            {
                "tenant": row.tenant,
                **dict.fromkeys(summed, 0),
                "histogram": [0] * (len(UsageDaily.LATENCY_BUCKETS_MS) + 1),
            },
        )
        for name in summed:
            entry[name] += getattr(row, name)
        for index, count in enumerate(row.latency_histogram or []):
            entry["histogram"][index] += count
    result = []
    for entry in tenants.values():
        entry["tokens"] = entry["prompt_tokens"] + entry["completion_tokens"]
        entry["error_rate"] = entry["failed"] / entry["requests"] if entry["requests"] else 0.0
        entry["p50_ms"] = UsageDaily.percentile_ms(entry["histogram"], 50)
        entry["p99_ms"] = UsageDaily.percentile_ms(entry["histogram"], 99)
        result.append(entry)
    return sorted(result, key=lambda e: -e["requests"])


def top_keys(since, limit=10, tenant_id=None) -> list[dict]:
    from django.db.models import F, Sum

    from inference.models import UsageDaily

    rows = UsageDaily.objects.filter(date__gte=since, api_key__isnull=False)
    if tenant_id is not None:
        rows = rows.filter(tenant_id=tenant_id)
    return list(
        rows.values("api_key_id", "api_key__name", "api_key__prefix", "tenant__name")
        .annotate(requests=Sum("requests"), tokens=Sum(F("prompt_tokens") + F("completion_tokens")))
        .order_by("-requests")[:limit]
    )


def usage_per_key_and_day(tenant_id, since) -> dict:
    """A tenant's daily rollups from ``since`` (a date) on, per key: ``{api_key_id: {date:
    {"requests", "tokens"}}}`` (days without usage left out). One query, whatever the number of keys."""
    from django.db.models import F, Sum

    from inference.models import UsageDaily

    rows = (
        UsageDaily.objects.filter(tenant_id=tenant_id, date__gte=since, api_key__isnull=False)
        .values("api_key_id", "date")
        .annotate(requests=Sum("requests"), tokens=Sum(F("prompt_tokens") + F("completion_tokens")))
    )
    per_key: dict = {}
    for row in rows:
        per_key.setdefault(row["api_key_id"], {})[row["date"]] = {"requests": row["requests"], "tokens": row["tokens"]}
    return per_key
