"""Usage rollups: each outcome (and each quota refusal) is added to its tenant's and key's day, on
the row of the query's model and endpoint."""

from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import F

from inference.models import Query, UsageDaily


def _row(tenant_id, api_key_id, date, model: str, endpoint: str) -> UsageDaily:
    """The day's row of that model and endpoint, locked for update (created when missing)."""
    where = {
        "date": date,
        "tenant_id": tenant_id,
        "api_key_id": api_key_id,
        "model": model or "",
        "endpoint": endpoint or "",
    }
    for _ in range(2):
        try:
            with transaction.atomic():
                row, _ = UsageDaily.objects.select_for_update().get_or_create(**where)
                return row
        except IntegrityError:  # created concurrently: take the other one
            continue
    return UsageDaily.objects.select_for_update().get(**where)


def record_outcome(query: Query) -> None:
    """Add a finished query to the rollup of its day (UTC, the day it was accepted), model and endpoint."""
    with transaction.atomic():
        row = _row(query.tenant_id, query.api_key_id, query.created_at.date(), query.model, query.endpoint)
        row.requests += 1
        row.prompt_tokens += query.prompt_tokens or 0
        row.completion_tokens += query.completion_tokens or 0
        if query.status == Query.Status.SUCCEEDED:
            row.succeeded += 1
            latency_ms = (query.total_seconds or 0) * 1000
            row.latency_ms_total += int(latency_ms)
            histogram = list(row.latency_histogram) or [0] * (len(UsageDaily.LATENCY_BUCKETS_MS) + 1)
            histogram[UsageDaily.bucket_of(latency_ms)] += 1
            row.latency_histogram = histogram
        else:
            row.failed += 1
        row.save()


def record_rejection(api_key, code: str, at: datetime, *, model: str = "", endpoint: str = "") -> None:
    """Count a quota refusal (no Query row is written for it), on the row of the model and endpoint
    it asked for ("" when the caller does not know them)."""
    where = {"date": at.date(), "tenant_id": api_key.tenant_id, "api_key_id": api_key.pk}
    updated = UsageDaily.objects.filter(**where, model=model or "", endpoint=endpoint or "").update(
        rejected=F("rejected") + 1
    )
    if not updated:
        with transaction.atomic():
            row = _row(api_key.tenant_id, api_key.pk, at.date(), model, endpoint)
            row.rejected += 1
            row.save(update_fields=["rejected"])
