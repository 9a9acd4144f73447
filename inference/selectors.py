"""Queries that read the query log. Tenants only ever see their own rows."""

import uuid
from decimal import Decimal

from django.db.models import Prefetch

from config import money
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
    "cost",
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


def tenant_query(tenant_id, query_id) -> Query | None:
    """One of the tenant's queries, with its images' facts (``with_images``); None if not theirs."""
    try:
        query_uuid = uuid.UUID(str(query_id))
    except ValueError:
        return None
    return with_images(tenant_queries(tenant_id).filter(pk=query_uuid)).first()


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
        spend=Sum("spend"),
    )
    totals = {name: value or 0 for name, value in totals.items()}
    totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    totals["spend"] = money.quantized(totals["spend"])
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

    summed = (
        "requests",
        "succeeded",
        "failed",
        "rejected",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms_total",
        "spend",
    )
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


def budget_status(tenant, at=None) -> dict:
    """What is left of the tenant's monthly budget and of each budgeted key's, from the rollups'
    spend of this UTC month (settled queries; running ones are not in it yet): for the tenant and
    per key, ``spent``, ``budget`` (None: none), ``left`` and ``fraction`` (spent / budget), and
    ``level``: "over" at 100 % and more, "warn" from 80 %, else "" (the dashboard's banner)."""
    from datetime import UTC, datetime

    from django.conf import settings
    from django.db.models import Sum

    from inference.models import UsageDaily

    at = at or datetime.now(UTC)
    month_start = at.date().replace(day=1)
    rows = UsageDaily.objects.filter(tenant_id=tenant.pk, date__gte=month_start, date__lte=at.date())
    by_key = dict(rows.filter(api_key__isnull=False).values_list("api_key_id").annotate(s=Sum("spend")).order_by())
    spent = money.quantized(rows.aggregate(s=Sum("spend"))["s"])

    def status(spent, budget) -> dict:
        fraction = money.fraction(spent, budget)
        level = "" if fraction is None else "over" if fraction >= 1 else "warn" if fraction >= Decimal("0.8") else ""
        left = None if budget is None else max(money.ZERO, money.quantized(budget) - spent)
        return {"spent": spent, "budget": budget, "left": left, "fraction": fraction, "level": level}

    keys = []
    for api_key in tenant.api_keys.filter(monthly_budget__isnull=False).only("id", "name", "prefix", "monthly_budget"):
        keys.append({"key": api_key, **status(money.quantized(by_key.get(api_key.pk)), api_key.monthly_budget)})
    return {"currency": settings.CURRENCY, "month": month_start, **status(spent, tenant.monthly_budget), "keys": keys}


# --- spend, for the operators' spend page (dashboard/views/admin.py) ------------------------------
def _rollups_between(since, until):
    from inference.models import UsageDaily

    return UsageDaily.objects.filter(date__gte=since, date__lte=until)


def spend_series(since, until, tenant_id=None) -> list[dict]:
    """Spend per day from ``since`` to ``until`` (dates; days without spend included)."""
    from datetime import timedelta

    from django.db.models import Sum

    rows = _rollups_between(since, until)
    if tenant_id is not None:
        rows = rows.filter(tenant_id=tenant_id)
    by_day = dict(rows.values_list("date").annotate(s=Sum("spend")).order_by())
    series, day = [], since
    while day <= until:
        series.append({"date": day, "spend": money.quantized(by_day.get(day))})
        day += timedelta(days=1)
    return series


def spend_by_tenant(since, until, at=None) -> list[dict]:
    """Per tenant: spend, requests and tokens from ``since`` to ``until``, this month's spend against
    its budget; the tenants at 80 % of their budget or more first (most spent first), then by spend."""
    from datetime import UTC, datetime

    from django.db.models import Sum

    from accounts.models import Tenant

    at = at or datetime.now(UTC)
    ranged = {
        row["tenant_id"]: row
        for row in _rollups_between(since, until)
        .values("tenant_id")
        .annotate(
            spend=Sum("spend"), requests=Sum("requests"), prompt=Sum("prompt_tokens"), out=Sum("completion_tokens")
        )
        .order_by()
    }
    month = dict(
        _rollups_between(at.date().replace(day=1), at.date())
        .values_list("tenant_id")
        .annotate(s=Sum("spend"))
        .order_by()
    )
    tenants = {t.pk: t for t in Tenant.objects.filter(pk__in=[k for k in ranged if k is not None])}
    tenants.update({t.pk: t for t in Tenant.objects.filter(monthly_budget__isnull=False)})
    result = []
    for tenant_id in set(tenants) | ({None} if None in ranged else set()):
        row = ranged.get(tenant_id, {})
        tenant = tenants.get(tenant_id)
        budget = tenant.monthly_budget if tenant is not None else None
        month_spend = money.quantized(month.get(tenant_id))
        fraction = money.fraction(month_spend, budget)
        result.append(
            {
                "tenant": tenant,
                "spend": money.quantized(row.get("spend")),
                "requests": row.get("requests") or 0,
                "tokens": (row.get("prompt") or 0) + (row.get("out") or 0),
                "month_spend": month_spend,
                "budget": budget,
                "fraction": fraction,
                "percent": None if fraction is None else int(fraction * 100),
                "alert": fraction is not None and fraction >= Decimal("0.8"),
            }
        )
    return sorted(result, key=lambda e: (not e["alert"], -(e["fraction"] or 0) if e["alert"] else 0, -e["spend"]))


def spend_by_key(since, until, limit=20) -> list[dict]:
    from django.db.models import Sum

    rows = _rollups_between(since, until).filter(api_key__isnull=False)
    return [
        {**row, "spend": money.quantized(row["spend"])}
        for row in rows.values(
            "api_key_id", "api_key__name", "api_key__prefix", "api_key__monthly_budget", "tenant__name"
        )
        .annotate(spend=Sum("spend"), requests=Sum("requests"))
        .order_by("-spend", "api_key_id")[:limit]
    ]


def spend_by_model(since, until) -> list[dict]:
    """Per model: spend and requests from ``since`` to ``until``. From the rollups when they carry the
    model; until then from the settled queries' costs (an index range of the query log)."""
    from datetime import UTC, datetime, time, timedelta

    from django.db.models import Count, Sum

    from inference.models import UsageDaily

    if any(f.name == "model" for f in UsageDaily._meta.fields):
        rows = _rollups_between(since, until).values("model").annotate(spend=Sum("spend"), requests=Sum("requests"))
    else:
        start = datetime.combine(since, time.min, tzinfo=UTC)
        end = datetime.combine(until + timedelta(days=1), time.min, tzinfo=UTC)
        rows = (
            Query.objects.filter(created_at__gte=start, created_at__lt=end, settled_at__isnull=False)
            .values("model")
            .annotate(spend=Sum("cost"), requests=Count("id"))
        )
    return sorted(
        ({**row, "spend": money.quantized(row["spend"])} for row in rows.order_by()),
        key=lambda r: (-r["spend"], r["model"] or ""),
    )


def spend_by_month(first_month=None) -> list[dict]:
    """Per tenant and UTC month (for invoicing): requests, tokens and spend from the rollups; tenants
    deleted since are one anonymised row per month (tenant None)."""
    from django.db.models import Sum
    from django.db.models.functions import TruncMonth

    from inference.models import UsageDaily

    rows = UsageDaily.objects.all() if first_month is None else UsageDaily.objects.filter(date__gte=first_month)
    return [
        {**row, "spend": money.quantized(row["spend"])}
        for row in rows.annotate(month=TruncMonth("date"))
        .values("month", "tenant_id", "tenant__slug", "tenant__name", "tenant__monthly_budget")
        .annotate(
            requests=Sum("requests"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            spend=Sum("spend"),
        )
        .order_by("month", "tenant__slug", "tenant_id")
    ]


def price_history() -> list[dict]:
    """Every model's prices, newest first, each marked scheduled, in effect or superseded; the served
    models without a price are listed with none ("no price set": they cost nothing)."""
    from django.utils import timezone

    from config import models_registry
    from inference.models import ModelPrice

    now = timezone.now()
    by_model: dict[str, list] = {name: [] for name in models_registry.names()}
    for row in ModelPrice.objects.select_related("created_by").order_by("model", "-effective_from"):
        by_model.setdefault(row.model, []).append(row)
    history = []
    for model, rows in sorted(by_model.items()):
        current = next((row for row in rows if row.effective_from <= now), None)
        entries = [
            {
                "row": row,
                "state": "scheduled" if row.effective_from > now else "in effect" if row is current else "superseded",
                "shown": [
                    money.plain(row.input_per_million),
                    money.plain(row.output_per_million),
                    money.plain(row.per_image),
                ],
            }
            for row in rows
        ]
        history.append({"model": model, "prices": entries, "current": current})
    return history
