"""Usage rollups: each outcome (and each quota refusal) is added to its tenant's and key's day, on
the row of the query's model and endpoint."""

import json
from datetime import datetime

from django.db import IntegrityError, connection, transaction
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
    succeeded = query.status == Query.Status.SUCCEEDED
    latency_ms = (query.total_seconds or 0) * 1000 if succeeded else 0
    if connection.vendor in ("postgresql", "sqlite") and query.tenant_id is not None and query.api_key_id is not None:
        _upsert_outcome(query, succeeded=succeeded, latency_ms=latency_ms)
    else:
        _orm_outcome(query, succeeded=succeeded, latency_ms=latency_ms)


def _orm_outcome(query: Query, *, succeeded: bool, latency_ms: float) -> None:
    with transaction.atomic():
        row = _row(query.tenant_id, query.api_key_id, query.created_at.date(), query.model, query.endpoint)
        row.requests += 1
        row.prompt_tokens += query.prompt_tokens or 0
        row.completion_tokens += query.completion_tokens or 0
        row.spend += query.cost or 0
        if succeeded:
            row.succeeded += 1
            row.latency_ms_total += int(latency_ms)
            histogram = list(row.latency_histogram) or [0] * (len(UsageDaily.LATENCY_BUCKETS_MS) + 1)
            histogram[UsageDaily.bucket_of(latency_ms)] += 1
            row.latency_histogram = histogram
        else:
            row.failed += 1
        row.save()


def _upsert_outcome(query: Query, *, succeeded: bool, latency_ms: float) -> None:
    """``record_outcome`` in one statement (it runs once per query, on the worker's path to the
    answer): INSERT .. ON CONFLICT DO UPDATE adds to the day's row or creates it, where the ORM took
    a savepoint, a locking read and a write. PostgreSQL and SQLite (3.24+) share the statement; only
    the JSON functions differ. Rows with a null tenant or key (deleted, anonymised) never conflict
    (NULLs are distinct), so those take the ORM path."""
    table = UsageDaily._meta.db_table
    empty = [0] * (len(UsageDaily.LATENCY_BUCKETS_MS) + 1)
    bucket = UsageDaily.bucket_of(latency_ms) if succeeded else None
    first = list(empty)
    if bucket is not None:
        first[bucket] = 1
    if bucket is None:
        histogram = "u.latency_histogram"
    elif connection.vendor == "postgresql":
        histogram = (
            "jsonb_set(CASE WHEN jsonb_array_length(u.latency_histogram) = %(n)s::int THEN u.latency_histogram "
            "ELSE %(empty)s::jsonb END, ARRAY[%(bucket)s::text], "
            "to_jsonb(COALESCE((u.latency_histogram ->> %(bucket)s::int)::bigint, 0) + 1))"
        )
    else:
        histogram = (
            "json_set(CASE WHEN json_array_length(u.latency_histogram) = %(n)s THEN u.latency_histogram "
            "ELSE %(empty)s END, '$[' || %(bucket)s || ']', "
            "COALESCE(json_extract(u.latency_histogram, '$[' || %(bucket)s || ']'), 0) + 1)"
        )
    as_json = "%(first)s::jsonb" if connection.vendor == "postgresql" else "%(first)s"
    sql = f"""
        INSERT INTO {table} AS u (date, tenant_id, api_key_id, model, endpoint, requests, succeeded, failed,
            rejected, prompt_tokens, completion_tokens, latency_ms_total, latency_histogram, spend)
        VALUES (%(date)s, %(tenant)s, %(key)s, %(model)s, %(endpoint)s, 1, %(ok)s, %(failed)s, 0, %(prompt)s,
            %(completion)s, %(latency)s, {as_json}, %(spend)s)
        ON CONFLICT (date, tenant_id, api_key_id, model, endpoint) DO UPDATE SET
            requests = u.requests + 1,
            succeeded = u.succeeded + excluded.succeeded,
            failed = u.failed + excluded.failed,
            prompt_tokens = u.prompt_tokens + excluded.prompt_tokens,
            completion_tokens = u.completion_tokens + excluded.completion_tokens,
            latency_ms_total = u.latency_ms_total + excluded.latency_ms_total,
            latency_histogram = {histogram},
            spend = u.spend + excluded.spend
    """
    spend = UsageDaily._meta.get_field("spend")
    with connection.cursor() as cursor:
        cursor.execute(
            sql,
            {
                "date": connection.ops.adapt_datefield_value(query.created_at.date()),
                "tenant": query.tenant_id,
                "key": query.api_key_id,
                "model": query.model or "",
                "endpoint": query.endpoint or "",
                "ok": int(succeeded),
                "failed": int(not succeeded),
                "prompt": query.prompt_tokens or 0,
                "completion": query.completion_tokens or 0,
                "latency": int(latency_ms),
                "first": json.dumps(first if succeeded else []),
                "spend": spend.get_db_prep_save(query.cost or 0, connection),
                "n": len(empty),
                "empty": json.dumps(empty),
                "bucket": bucket,
            },
        )


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
