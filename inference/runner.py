"""Running one query on a worker: the same code in a Celery worker and in the embedded thread.

The runner claims the query (``queued`` -> ``running``; a query claimed or finished already is
never run again), streams the generation, publishes coalesced deltas, writes the outcome to the
row, and only then publishes ``done`` or ``error``, so that whoever reads the row after that
message sees the final state.
"""

import io
import logging
import time
from collections.abc import Callable

from django.conf import settings
from django.utils import timezone
from PIL import Image

from inference import events, selectors
from inference.engine import Completion, EngineError, GenerationParams
from inference.models import Query

logger = logging.getLogger("sightline.runner")


def claim(query_id, worker: str) -> bool:
    """Mark a queued query running. False when another worker has it, or it is finished."""
    updated = Query.objects.filter(pk=query_id, status=Query.Status.QUEUED).update(
        status=Query.Status.RUNNING, started_at=timezone.now(), worker=worker
    )
    return updated == 1


def settle(query_id) -> bool:
    """After a query's outcome is written: refund its unused token reservation, free its concurrent
    slot, and add it to the usage rollup. Whoever ended the query calls this; the sweeper calls it
    again for a query whose ender died in between. Safe to repeat: the quota side refunds only the
    call that ends the reservation, and the rollup is added in the transaction that marks ``settled_at``."""
    from django.db import transaction

    from accounts import quotas
    from inference import usage

    query = Query.objects.get(pk=query_id)
    if query.settled_at is not None or not query.is_finished:
        return False
    try:
        quotas.settle(query.api_key_id, query.pk, used=query.total_tokens or 0)
    except Exception:  # Redis down: the sweeper retries; the slot's lease bounds the damage meanwhile
        logger.exception("could not settle the quota of query %s", query_id)
        return False
    with transaction.atomic():
        if not Query.objects.filter(pk=query_id, settled_at__isnull=True).update(settled_at=timezone.now()):
            return False
        usage.record_outcome(query)
    return True


def fail(
    query_id,
    code: str,
    message: str,
    *,
    answer: str | None = None,
    publisher=None,
    statuses=(Query.Status.QUEUED, Query.Status.RUNNING),
    **fields,
) -> bool:
    """End an unfinished query ``failed`` with a reason; publish the error. False if it had ended already."""
    now = timezone.now()
    values = {"status": Query.Status.FAILED, "error_code": code, "error_message": message, "finished_at": now}
    if answer is not None:
        values["answer"] = answer
    values.update(fields)
    updated = Query.objects.filter(pk=query_id, status__in=statuses).update(**values)
    if updated:
        settle(query_id)
        if publisher is not None:
            publisher.publish(
                query_id, {"type": events.ERROR, "query_id": str(query_id), "code": code, "message": message}
            )
    return updated == 1


def usage_of(completion: Completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def execute(
    query_id,
    engine,
    publisher: events.Publisher,
    worker: str,
    should_stop: Callable[[], bool] | None = None,
) -> str | None:
    """Run one query to its outcome. Returns the final status, or None when it was not ours to run."""
    if not claim(query_id, worker):
        logger.info("query %s is not queued any more; not running it again", query_id)
        return None
    query = Query.objects.get(pk=query_id)
    publisher.publish(query_id, {"type": events.STARTED, "query_id": str(query_id)})
    params = GenerationParams(
        max_new_tokens=int(query.params.get("max_tokens", settings.DEFAULT_MAX_TOKENS)),
        temperature=float(query.params.get("temperature", 0.0)),
        top_p=float(query.params.get("top_p", 1.0)),
    )
    pieces: list[str] = []
    pending: list[str] = []
    first_token_at = None
    last_flush = 0.0

    def flush() -> None:
        nonlocal last_flush
        if pending:
            publisher.publish(query_id, {"type": events.TOKEN, "query_id": str(query_id), "text": "".join(pending)})
            pending.clear()
        last_flush = time.monotonic()

    try:
        # Until the engine takes every image (EngineRequest), it gets the first (or none: text only).
        messages, images = selectors.conversation_of(query)
        image = Image.open(io.BytesIO(images[0])).convert("RGB") if images else None
        generation = engine.stream(image, query.prompt, params, should_stop=should_stop, messages=messages)
        for delta in generation:
            if first_token_at is None:
                first_token_at = timezone.now()
            pieces.append(delta)
            pending.append(delta)
            # Coalesce: at most one message per STREAM_COALESCE_SECONDS.
            if time.monotonic() - last_flush >= settings.STREAM_COALESCE_SECONDS:
                flush()
        flush()
        completion = generation.result
    except EngineError as exc:
        flush()
        fail(
            query_id, exc.code, exc.message, answer="".join(pieces), first_token_at=first_token_at, publisher=publisher
        )
        return Query.Status.FAILED
    except Exception as exc:  # never leave a query running because of a bug
        logger.exception("query %s failed", query_id)
        flush()
        fail(query_id, "internal_error", f"Inference failed: {type(exc).__name__}", publisher=publisher)
        return Query.Status.FAILED

    if completion.finish_reason == "cancelled":
        fail(
            query_id,
            "cancelled",
            "The client cancelled the query.",
            answer=completion.text,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            finish_reason="cancelled",
            first_token_at=first_token_at,
            publisher=publisher,
        )
        return Query.Status.FAILED

    finished_at = timezone.now()
    updated = Query.objects.filter(pk=query_id, status=Query.Status.RUNNING).update(
        status=Query.Status.SUCCEEDED,
        answer=completion.text,
        finish_reason=completion.finish_reason,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        first_token_at=first_token_at or finished_at,
        finished_at=finished_at,
    )
    if not updated:  # ended meanwhile by someone else (the sweeper): their outcome stands
        return None
    settle(query_id)
    publisher.publish(
        query_id,
        {
            "type": events.DONE,
            "query_id": str(query_id),
            "result": completion.text,
            "finish_reason": completion.finish_reason,
            "usage": usage_of(completion),
            "cost_time": round((finished_at - query.created_at).total_seconds(), 3),
        },
    )
    return Query.Status.SUCCEEDED
