"""What is kept of a query, for how long, and how it goes: privacy modes, retention, deletion.

Privacy modes (``Tenant.privacy_mode``, copied onto each query when it is accepted):

* ``full``: the conversation, the answer and the images are kept (until retention removes them).
* ``no_images``: the images are removed when the query settles; their sizes, formats and hashes stay.
* ``metadata``: only sizes, hashes, tokens, timings and the outcome are kept. The worker needs the
  conversation and the images to run the query, and the client waiting for it needs the answer,
  so: the conversation, the images and the client's address are removed when the query settles
  (the moment its outcome is added to the usage rollups); the answer is held METADATA_HOLD_SECONDS
  after the query ended, for the request that waits for it (or a poll of ``/v1/queries`` after a
  504, or an async job), then the pruner removes it. Pages, exports and the CSV never show it.

Retention (``Tenant.content_retention_days`` and ``image_retention_days``, None = until deleted):
``prune`` blanks the content of queries older than that and removes their images, in batches of
their own short transactions; the rows (tokens, timings, outcome) and the usage rollups stay.

Deletion (``delete_queries``): a tenant's or a key's queries, rows and images, in batches; the
usage rollups stay (a deleted tenant's anonymised: no tenant, no key).
"""

import logging
import time
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.db.models.expressions import RawSQL
from django.utils import timezone

from accounts.models import PrivacyMode, Tenant
from inference import imagestore
from inference.models import Query, QueryImage, UsageDaily

logger = logging.getLogger("sightline.privacy")

FINISHED = (Query.Status.SUCCEEDED, Query.Status.FAILED)
# What the conversation holds (removed when a metadata-mode query settles).
INPUT_BLANK = {"prompt": "", "messages": [], "client_ip": None, "user_agent": ""}
# Everything the content is (removed by retention, and from metadata-mode queries after the hold).
CONTENT_BLANK = {**INPUT_BLANK, "answer": "", "reasoning": "", "tool_calls": [], "choices": []}
# Request fields that carry the client's content (tool definitions, schemas, stop strings, the
# Responses API's instructions, OpenAI's user and metadata); the decoding numbers stay.
CONTENT_PARAMS = (
    "tools",
    "tool_choice",
    "response_format",
    "stop",
    "logit_bias",
    "instructions",
    "user",
    "metadata",
    "safety_identifier",
    "prompt_cache_key",
)


# --- what a query keeps --------------------------------------------------------------------------
def content_shown(query: Query) -> bool:
    """Whether pages and exports show the query's prompt, conversation and answer."""
    return query.privacy_mode != PrivacyMode.METADATA and query.content_removed_at is None


def images_shown(query: Query) -> bool:
    return query.privacy_mode == PrivacyMode.FULL and query.images_removed_at is None


def answer_held_until(query: Query):
    """For a metadata-mode query: until when its answer is held for the client (None otherwise)."""
    if query.privacy_mode != PrivacyMode.METADATA or query.content_removed_at is not None:
        return None
    if query.finished_at is None:
        return None
    return query.finished_at + timedelta(seconds=settings.METADATA_HOLD_SECONDS)


def kept(query: Query) -> dict:
    """What is kept of the query, and a sentence saying plainly what is not (the API, the export)."""
    mode = query.privacy_mode
    not_kept, notes = [], []
    if mode == PrivacyMode.METADATA:
        not_kept += ["prompt", "messages", "answer", "images"]
        notes.append(
            "Privacy mode 'metadata': the prompt, the conversation, the answer and the images are not kept; "
            "only sizes, hashes, tokens, timings and the outcome."
        )
        held = answer_held_until(query)
        if held is not None:
            notes.append(f"The answer is held until {held.isoformat()} for the client to collect, then removed.")
    else:
        if query.content_removed_at is not None:
            not_kept += ["prompt", "messages", "answer"]
            notes.append(
                f"The prompt, the conversation and the answer were removed on {query.content_removed_at.date()}"
                " (the tenant's retention)."
            )
        if mode == PrivacyMode.NO_IMAGES:
            not_kept.append("images")
            notes.append("Privacy mode 'no_images': the images are not kept (only their sizes, formats and hashes).")
        elif query.images_removed_at is not None:
            not_kept.append("images")
            notes.append(f"The images were removed on {query.images_removed_at.date()} (the tenant's retention).")
    return {
        "privacy_mode": mode,
        "not_kept": not_kept,
        "content_removed_at": query.content_removed_at,
        "images_removed_at": query.images_removed_at,
        "note": " ".join(notes) or "Everything is kept.",
    }


def tenant_policy(tenant: Tenant) -> str:
    """The tenant's choice in one sentence (dashboard pages)."""
    mode = {
        PrivacyMode.FULL: "prompts, answers and images are kept",
        PrivacyMode.NO_IMAGES: "prompts and answers are kept; images are not (only their sizes, formats and hashes)",
        PrivacyMode.METADATA: "prompts, answers and images are not kept: only sizes, hashes, tokens, timings and "
        "outcomes",
    }[tenant.privacy_mode]

    def days(value, what):
        return f"{what} kept until deleted" if value is None else f"{what} removed after {value} days"

    return (
        f"Privacy mode '{tenant.privacy_mode}': {mode}. "
        f"{days(tenant.content_retention_days, 'Prompts and answers')}; "
        f"{days(tenant.image_retention_days, 'images')}."
    )


# --- removing ------------------------------------------------------------------------------------
def remove_content(ids, now=None) -> int:
    """Blank the prompt, conversation, answer, client details and the request's content fields of
    these queries (one UPDATE, in the caller's transaction). Returns how many rows changed."""
    now = now or timezone.now()
    rows = Query.objects.filter(pk__in=ids, content_removed_at__isnull=True)
    values = {**CONTENT_BLANK, "content_removed_at": now}
    if connection.vendor == "postgresql":  # jsonb minus text[]: the content fields out of params
        values["params"] = RawSQL(f"{Query._meta.db_table}.params - %s::text[]", (list(CONTENT_PARAMS),))
        return rows.update(**values)
    stripped = [
        Query(pk=pk, params={k: v for k, v in (params or {}).items() if k not in CONTENT_PARAMS})
        for pk, params in rows.values_list("pk", "params")
    ]
    changed = rows.update(**values)
    Query.objects.bulk_update(stripped, ["params"])
    return changed


def remove_images(ids, now=None) -> list[str]:
    """Forget these queries' images (the rows keep sizes, formats and hashes); returns the keys the
    caller releases once committed (``imagestore.release``)."""
    now = now or timezone.now()
    images = QueryImage.objects.filter(query_id__in=ids).exclude(key="")
    keys = list(images.values_list("key", flat=True))
    images.update(key="", content=None)
    QueryImage.objects.filter(query_id__in=ids, content__isnull=False).update(content=None)
    Query.objects.filter(pk__in=ids, stored_images__gt=0).update(stored_images=0, images_removed_at=now)
    return keys


def on_settle(query: Query) -> None:
    """Inside the transaction that settles a finished query: what its privacy mode does not keep
    goes now (the objects once the transaction has committed)."""
    if query.privacy_mode == PrivacyMode.FULL:
        return
    keys = remove_images([query.pk])
    if query.privacy_mode == PrivacyMode.METADATA:
        Query.objects.filter(pk=query.pk).update(**INPUT_BLANK)
    imagestore.release_on_commit(keys)


def _in_batches(queryset, action, *, order: str, batch: int, deadline: float | None) -> int:
    """Apply ``action(ids)`` to ``queryset`` ``batch`` rows at a time, each batch in a transaction of
    its own (never one long transaction), until nothing is left or ``deadline`` (monotonic) passed."""
    done = 0
    while deadline is None or time.monotonic() < deadline:
        ids = list(queryset.order_by(order).values_list("pk", flat=True)[:batch])
        if not ids:
            break
        with transaction.atomic():
            keys = action(ids)
        if keys:
            imagestore.release(keys)
        done += len(ids)
        if len(ids) < batch:
            break
    return done


def prune(
    *, now=None, batch: int | None = None, seconds: float | None = None, tenant_id=None, orphan_shards=None
) -> dict:
    """Remove what has expired, in batches: metadata-mode answers past their hold, content past its
    tenant's content retention, images past its image retention; move images rows of the previous
    release still hold into storage; and delete orphaned objects (written, never referenced: the
    writer died before its commit) of ``orphan_shards`` (default: this pass's shard,
    ``imagestore.shard_of_pass``; not with ``tenant_id``). Stops after ``seconds`` (None: when
    done). Returns counts of each."""
    now = now or timezone.now()
    batch = batch or settings.PRUNE_BATCH_SIZE
    deadline = None if seconds is None else time.monotonic() + seconds
    counts = {"answers_released": 0, "content_removed": 0, "images_removed": 0, "images_moved": 0, "orphans_removed": 0}

    def blank(ids):
        remove_content(ids, now)

    def drop(ids):
        return remove_images(ids, now)

    held = Query.objects.filter(
        privacy_mode=PrivacyMode.METADATA,
        content_removed_at__isnull=True,
        finished_at__lt=now - timedelta(seconds=settings.METADATA_HOLD_SECONDS),
    )
    if tenant_id is not None:
        held = held.filter(tenant_id=tenant_id)
    counts["answers_released"] = _in_batches(held, blank, order="finished_at", batch=batch, deadline=deadline)

    tenants = Tenant.objects.filter(Q(content_retention_days__isnull=False) | Q(image_retention_days__isnull=False))
    if tenant_id is not None:
        tenants = tenants.filter(pk=tenant_id)
    for tenant_pk, content_days, image_days in tenants.values_list(
        "pk", "content_retention_days", "image_retention_days"
    ):
        if content_days is not None:
            expired = Query.objects.filter(
                tenant_id=tenant_pk,
                content_removed_at__isnull=True,
                created_at__lt=now - timedelta(days=content_days),
                status__in=FINISHED,
            )
            counts["content_removed"] += _in_batches(expired, blank, order="created_at", batch=batch, deadline=deadline)
        if image_days is not None:
            expired = Query.objects.filter(
                tenant_id=tenant_pk,
                stored_images__gt=0,
                created_at__lt=now - timedelta(days=image_days),
                status__in=FINISHED,
            )
            counts["images_removed"] += _in_batches(expired, drop, order="created_at", batch=batch, deadline=deadline)
    if deadline is None or time.monotonic() < deadline:
        counts["images_moved"] = imagestore.move_rows_to_storage(Query, QueryImage, batch=batch)
    if tenant_id is None and (deadline is None or time.monotonic() < deadline):
        if orphan_shards is None:
            orphan_shards = [imagestore.shard_of_pass(now, settings.PRUNE_INTERVAL_SECONDS)]
        counts["orphans_removed"] = imagestore.collect_orphans(
            grace=timedelta(seconds=settings.ORPHAN_IMAGE_GRACE_SECONDS),
            shards=orphan_shards,
            batch=batch,
            deadline=deadline,
            now=now,
        )
    if any(counts.values()):
        logger.info("pruned: %s", counts)
    return counts


def delete_queries(*, tenant_id=None, api_key_id=None, batch: int = 500) -> dict:
    """Delete a tenant's or a key's queries: rows and stored images, in batches of their own
    transactions. The usage rollups stay. Returns counts."""
    if tenant_id is None and api_key_id is None:
        raise ValueError("delete_queries wants a tenant or a key")
    queries = Query.objects.all()
    if tenant_id is not None:
        queries = queries.filter(tenant_id=tenant_id)
    if api_key_id is not None:
        queries = queries.filter(api_key_id=api_key_id)
    counts = {"queries": 0, "images": 0, "objects": 0}
    while True:
        ids = list(queries.order_by().values_list("pk", flat=True)[:batch])
        if not ids:
            return counts
        with transaction.atomic():
            images = QueryImage.objects.filter(query_id__in=ids)
            keys = list(images.exclude(key="").values_list("key", flat=True))
            counts["images"] += images._raw_delete(images.db)
            rows = Query.objects.filter(pk__in=ids)
            counts["queries"] += rows._raw_delete(rows.db)
        counts["objects"] += imagestore.release(keys)


def delete_tenant(tenant: Tenant, *, batch: int = 500) -> dict:
    """Delete a tenant: its queries and images (``delete_queries``), then its keys, memberships and
    the tenant itself. Its usage rollups stay, anonymised (no tenant, no key)."""
    counts = delete_queries(tenant_id=tenant.pk, batch=batch)
    counts["rollups_anonymised"] = UsageDaily.objects.filter(tenant_id=tenant.pk).update(tenant=None, api_key=None)
    tenant.delete()
    return counts
