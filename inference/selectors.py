"""Queries that read the query log. Tenants only ever see their own rows."""

import uuid
from decimal import Decimal

from django.db.models import Prefetch

from config import money
from inference import chat, imagestore
from inference.models import Query, QueryImage, UsageDaily

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
    k-th ``{"type": "image"}`` part."""
    rows = query.images.only("id", "query_id", "position", "key").order_by("position")
    images = [image_bytes(image) for image in rows]
    return messages_of(query, len(images)), images


def messages_of(query: Query, images: int) -> list:
    """The query's conversation in the chat template's form. A row written before conversations
    were stored asks its prompt about its ``images``."""
    return query.messages or chat.one_turn(query.prompt, images)


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


def usage_series(since, tenant_id=None, api_key_id=None, until=None) -> list[dict]:
    """Per day from ``since`` to ``until`` (default today; days without usage included): requests,
    tokens, failures."""
    from datetime import UTC, datetime, timedelta

    from django.db.models import Sum

    from inference.models import UsageDaily

    today = until or datetime.now(UTC).date()
    rows = UsageDaily.objects.filter(date__gte=since, date__lte=today)
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


def usage_by_tenant(since=None, until=None) -> list[dict]:
    """Per tenant from ``since`` to ``until`` (dates; None: all time, up to today): requests,
    outcomes, tokens, error rate, the summed latency histogram and its p50/p95/p99, most requests first."""
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
    if until is not None:
        rows = rows.filter(date__lte=until)
    # Plain tuples, not model instances: thousands of rollup rows for 90 days of many keys.
    for tenant_id, histogram, *sums in rows.values_list("tenant_id", "latency_histogram", *summed).iterator(
        chunk_size=5000
    ):
        entry = tenants.get(tenant_id)
        if entry is None:
            entry = tenants[tenant_id] = {"tenant": None, **dict.fromkeys(summed, 0), "histogram": _empty_histogram()}
        for name, amount in zip(summed, sums, strict=True):
            entry[name] += amount
        _add_histogram(entry["histogram"], histogram)
    from accounts.models import Tenant

    names = Tenant.objects.in_bulk([t for t in tenants if t is not None])
    for tenant_id, entry in tenants.items():
        entry["tenant"] = names.get(tenant_id)
    result = []
    for entry in tenants.values():
        entry["tokens"] = entry["prompt_tokens"] + entry["completion_tokens"]
        entry["error_rate"] = entry["failed"] / entry["requests"] if entry["requests"] else 0.0
        entry["p50_ms"] = UsageDaily.percentile_ms(entry["histogram"], 50)
        entry["p95_ms"] = UsageDaily.percentile_ms(entry["histogram"], 95)
        entry["p99_ms"] = UsageDaily.percentile_ms(entry["histogram"], 99)
        result.append(entry)
    return sorted(result, key=lambda e: -e["requests"])


def top_keys(since, limit=10, tenant_id=None, until=None) -> list[dict]:
    """The keys with the most requests from ``since`` to ``until`` (default: today), with their tokens."""
    from django.db.models import F, Sum

    from inference.models import UsageDaily

    rows = UsageDaily.objects.filter(date__gte=since, api_key__isnull=False)
    if until is not None:
        rows = rows.filter(date__lte=until)
    if tenant_id is not None:
        rows = rows.filter(tenant_id=tenant_id)
    return list(
        rows.values("api_key_id", "api_key__name", "api_key__prefix", "tenant__name")
        .annotate(requests=Sum("requests"), tokens=Sum(F("prompt_tokens") + F("completion_tokens")))
        .order_by("-requests")[:limit]
    )


# What a usage breakdown groups the rollups by: its name -> the rollup field.
BREAKDOWNS = {"key": "api_key_id", "model": "model", "endpoint": "endpoint", "tenant": "tenant_id"}
EARLIER = "(earlier)"  # rows written before the rollups knew the model and endpoint
OTHER = "other"
PERCENTILES = (50, 95, 99)
_SUMMED = ("requests", "succeeded", "failed", "rejected", "prompt_tokens", "completion_tokens", "spend")
_HISTOGRAM_SLOTS = len(UsageDaily.LATENCY_BUCKETS_MS) + 1


def _group_labels(by: str, values: set, *, with_tenant: bool) -> dict:
    """A readable name for each group value of a breakdown."""
    from accounts.models import ApiKey, Tenant
    from inference.models import Query

    if by == "tenant":
        names = dict(Tenant.objects.filter(pk__in=[v for v in values if v is not None]).values_list("pk", "name"))
        return {value: names.get(value, "(deleted tenants, anonymised)") for value in values}
    if by == "key":
        keys = ApiKey.objects.filter(pk__in=[v for v in values if v is not None]).select_related("tenant")
        names = {
            key.pk: (f"{key.tenant.name} / " if with_tenant else "") + f"{key.name} (sl_{key.prefix}_…)"
            for key in keys.only("name", "prefix", "tenant__name")
        }
        return {value: names.get(value, "(deleted key)") for value in values}
    if by == "endpoint":
        endpoints = dict(Query.Endpoint.choices)
        return {value: endpoints.get(value, value) if value else EARLIER for value in values}
    return {value: value or EARLIER for value in values}


def _empty_histogram() -> list[int]:
    # Called for every (group, day) cell of a breakdown (tens of thousands for 90 days of many keys):
    # a module-level constant, not an import per call (that import was half of the admin usage page).
    return [0] * _HISTOGRAM_SLOTS


def _add_histogram(into: list[int], histogram) -> None:
    for index, count in enumerate(histogram or []):
        into[index] += count


def _figures(sums: dict, histogram: list[int]) -> dict:
    """Derived figures of summed rollups: tokens, error rate (failed / requests, None without
    requests) and the latency percentiles (upper bounds of the histogram's buckets, ms)."""
    from inference.models import UsageDaily

    out = dict(sums)
    out["spend"] = money.quantized(sums["spend"])  # Decimal, also on a day without usage (0 -> 0E-9)
    out["tokens"] = sums["prompt_tokens"] + sums["completion_tokens"]
    out["error_rate"] = sums["failed"] / sums["requests"] if sums["requests"] else None
    out["histogram"] = histogram
    for q in PERCENTILES:
        out[f"p{q}_ms"] = UsageDaily.percentile_ms(histogram, q)
    return out


def usage_breakdown(*, start, end, by: str, tenant_id=None, top: int = 5, rank_by: str = "requests") -> dict:
    """The daily rollups from ``start`` to ``end`` (dates, both included; days without usage too),
    for a tenant (None: all tenants), broken down ``by`` key, model, endpoint or tenant: the ``top``
    groups with the most ``rank_by`` (requests, or spend, ...) over the range, the rest summed as
    "other".

    Returns ``{"days": [date…], "by": by, "groups": [group…], "totals": [day…], "summary": day}``,
    where each group is ``{"value", "label", "days": [day…], "summary": day}``, and each "day" is
    the summed ``requests, succeeded, failed, rejected, prompt_tokens, completion_tokens, spend,
    tokens, error_rate, histogram, p50_ms, p95_ms, p99_ms`` (``spend``: a ``Decimal`` of the
    currency, with the quantum's 9 decimals; never a float). The groups' days add up to ``totals``.
    Only the rollups are read, never the query log.
    """
    from datetime import timedelta

    from inference.models import UsageDaily

    if by not in BREAKDOWNS:
        raise ValueError(f"unknown breakdown {by!r}")
    if rank_by not in _SUMMED:
        raise ValueError(f"unknown figure {rank_by!r}")
    field = BREAKDOWNS[by]
    days = [start + timedelta(days=n) for n in range((end - start).days + 1)]
    index = {day: n for n, day in enumerate(days)}
    rows = UsageDaily.objects.filter(date__gte=start, date__lte=end)
    if tenant_id is not None:
        rows = rows.filter(tenant_id=tenant_id)
    # Per (group value, day): the sums and the histogram.
    cells: dict = {}
    for date, value, histogram, *sums in rows.values_list("date", field, "latency_histogram", *_SUMMED).iterator(
        chunk_size=5000
    ):
        cell = cells.get((value, date))
        if cell is None:
            cell = cells[(value, date)] = [dict.fromkeys(_SUMMED, 0), _empty_histogram()]
        for name, amount in zip(_SUMMED, sums, strict=True):
            cell[0][name] += amount
        _add_histogram(cell[1], histogram)

    per_group: dict = {}
    for (value, date), cell in cells.items():
        group = per_group.get(value)
        if group is None:  # not setdefault: its default (a cell per day) would be built for every cell
            group = per_group[value] = [[dict.fromkeys(_SUMMED, 0), _empty_histogram()] for _ in days]
        for name in _SUMMED:
            group[index[date]][0][name] += cell[0][name]
        _add_histogram(group[index[date]][1], cell[1])

    def total_of(day_cells, name):
        return sum(cell[0][name] for cell in day_cells)

    ranked = sorted(
        per_group,
        key=lambda v: (
            -total_of(per_group[v], rank_by),
            -total_of(per_group[v], "requests"),
            -total_of(per_group[v], "rejected"),
            str(v),
        ),
    )
    shown, rest = ranked[:top], ranked[top:]
    if len(rest) == 1:  # "other" would be one group: show it by its name
        shown, rest = ranked, []
    labels = _group_labels(by, set(shown), with_tenant=tenant_id is None)
    chosen = [(value, labels[value], per_group[value]) for value in shown]
    if rest:
        other = [[dict.fromkeys(_SUMMED, 0), _empty_histogram()] for _ in days]
        for value in rest:
            for n, cell in enumerate(per_group[value]):
                for name in _SUMMED:
                    other[n][0][name] += cell[0][name]
                _add_histogram(other[n][1], cell[1])
        chosen.append((OTHER, f"{OTHER} ({len(rest)} more)", other))

    def summed(day_cells) -> dict:
        histogram = _empty_histogram()
        for cell in day_cells:
            _add_histogram(histogram, cell[1])
        return _figures({name: total_of(day_cells, name) for name in _SUMMED}, histogram)

    groups = [
        {
            "value": value,
            "label": label,
            "days": [_figures(cell[0], cell[1]) for cell in day_cells],
            "summary": summed(day_cells),
        }
        for value, label, day_cells in chosen
    ]
    totals = []
    for n in range(len(days)):
        histogram = _empty_histogram()
        sums = dict.fromkeys(_SUMMED, 0)
        for day_cells in per_group.values():
            for name in _SUMMED:
                sums[name] += day_cells[n][0][name]
            _add_histogram(histogram, day_cells[n][1])
        totals.append({"date": days[n], **_figures(sums, histogram)})
    everything = _empty_histogram()
    for day in totals:
        _add_histogram(everything, day["histogram"])
    summary = _figures({name: sum(day[name] for day in totals) for name in _SUMMED}, everything)
    return {"days": days, "by": by, "groups": groups, "totals": totals, "summary": summary}


def usage_per_key(tenant_id, *, month_start, today) -> dict:
    """Per key of the tenant, from the rollups: requests today and this month, tokens this month
    (what the per-key day and month quotas count)."""
    from django.db.models import F, Q, Sum

    from inference.models import UsageDaily

    rows = (
        UsageDaily.objects.filter(tenant_id=tenant_id, api_key__isnull=False, date__gte=month_start, date__lte=today)
        .values("api_key_id")
        .annotate(
            requests_month=Sum("requests"),
            tokens_month=Sum(F("prompt_tokens") + F("completion_tokens")),
            requests_today=Sum("requests", filter=Q(date=today)),
        )
        .order_by()
    )
    return {
        row["api_key_id"]: {name: row[name] or 0 for name in ("requests_month", "tokens_month", "requests_today")}
        for row in rows
    }


def usage_per_key_and_day(tenant_id, since) -> dict:
    """A tenant's daily rollups from ``since`` (a date) on, per key: ``{api_key_id: {date:
    {"requests", "tokens", "spend"}}}`` (days without usage left out; ``spend`` a ``Decimal``). One
    query, whatever the number of keys."""
    from django.db.models import F, Sum

    from inference.models import UsageDaily

    rows = (
        UsageDaily.objects.filter(tenant_id=tenant_id, date__gte=since, api_key__isnull=False)
        .values("api_key_id", "date")
        .annotate(requests=Sum("requests"), tokens=Sum(F("prompt_tokens") + F("completion_tokens")), spend=Sum("spend"))
    )
    per_key: dict = {}
    for row in rows:
        per_key.setdefault(row["api_key_id"], {})[row["date"]] = {
            "requests": row["requests"],
            "tokens": row["tokens"],
            "spend": money.quantized(row["spend"]),
        }
    return per_key


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
    """Per model: spend and requests from ``since`` to ``until``, from the rollups (rows written
    before the rollups knew the model are the model "")."""
    from django.db.models import Sum

    rows = _rollups_between(since, until).values("model").annotate(spend=Sum("spend"), requests=Sum("requests"))
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
