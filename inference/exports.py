"""A tenant's query log as JSON Lines: one object per query, oldest first, read in keyset pages
(no OFFSET, no long transaction, no server-side cursor), so an export of millions of rows streams
in constant memory. What a query does not keep is null, and ``kept`` says why."""

import json
from collections.abc import AsyncIterator, Callable, Iterator

from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import Q

from inference import privacy, selectors, serializers
from inference.models import Query

PAGE = 500


def record(query: Query, image_url: Callable[[Query, int], str]) -> dict:
    """One query of the export. ``image_url(query, position)`` links each kept image."""
    shown = privacy.content_shown(query)
    images_shown = privacy.images_shown(query)
    key = query.api_key
    return {
        "id": str(query.pk),
        "created_at": query.created_at,
        "api_key": None if key is None else {"id": key.pk, "name": key.name, "prefix": f"sl_{key.prefix}_"},
        "model": query.model,
        "endpoint": query.endpoint,
        "status": query.status,
        "kept": privacy.kept(query),
        "prompt": query.prompt if shown else None,
        "messages": query.messages if shown else None,
        "answer": query.answer if shown else None,
        "reasoning": query.reasoning if shown else None,
        "tool_calls": query.tool_calls if shown else None,
        "choices": query.choices if shown else None,
        "finish_reason": query.finish_reason,
        "params": query.params if shown else {k: v for k, v in query.params.items() if k not in privacy.CONTENT_PARAMS},
        "usage": {
            "prompt_tokens": query.prompt_tokens,
            "completion_tokens": query.completion_tokens,
            "reasoning_tokens": query.reasoning_tokens,
        },
        "error": {"code": query.error_code, "message": query.error_message} if query.error_code else None,
        "timings": {
            "queue_seconds": query.queue_seconds,
            "first_token_seconds": query.first_token_seconds,
            "total_seconds": query.total_seconds,
        },
        "images": [
            {
                **serializers.image_info(image),  # the API's shape, plus whether this export shows it
                "kept": images_shown and image.is_kept,
                "url": image_url(query, image.position) if images_shown and image.is_kept else None,
            }
            for image in sorted(query.images.all(), key=lambda image: image.position)
        ],
    }


def pages(tenant_id, image_url: Callable[[Query, int], str], *, api_key_id=None) -> Iterator[str]:
    """``lines``, a keyset page of them at a time (one string per page)."""
    page: list[str] = []
    for line in lines(tenant_id, image_url, api_key_id=api_key_id):
        page.append(line)
        if len(page) == PAGE:
            yield "".join(page)
            page = []
    if page:
        yield "".join(page)


async def apages(tenant_id, image_url: Callable[[Query, int], str], *, api_key_id=None) -> AsyncIterator[str]:
    """``pages`` for an ASGI server: each page read in the worker thread, sent as soon as it is read
    (Django would read a synchronous iterator whole before sending any of it)."""
    from asgiref.sync import sync_to_async

    iterator = pages(tenant_id, image_url, api_key_id=api_key_id)
    done = object()
    while True:
        page = await sync_to_async(next)(iterator, done)
        if page is done:
            return
        yield page


def lines(tenant_id, image_url: Callable[[Query, int], str], *, api_key_id=None) -> Iterator[str]:
    """The tenant's queries (or one key's), oldest first, one JSON object per line."""
    queries = Query.objects.filter(tenant_id=tenant_id).select_related("api_key")
    if api_key_id is not None:
        queries = queries.filter(api_key_id=api_key_id)
    after = None
    while True:
        page = queries
        if after is not None:
            page = page.filter(Q(created_at__gt=after[0]) | Q(created_at=after[0], id__gt=after[1]))
        rows = list(selectors.with_images(page.order_by("created_at", "id"))[:PAGE])
        for query in rows:
            yield json.dumps(record(query, image_url), cls=DjangoJSONEncoder, ensure_ascii=False) + "\n"
        if len(rows) < PAGE:
            return
        after = (rows[-1].created_at, rows[-1].pk)
