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

from inference import events, handoff, selectors
from inference.engine import Choice, Delta, EngineError, EngineRequest, Result, SamplingParams
from inference.models import Query

logger = logging.getLogger("sightline.runner")

# Endpoints whose requests wait for the answer (without ``stream``) on the finished signal, which
# then carries the row; an async job's or a websocket's would hold it in Redis unread.
WAITED_ON = (Query.Endpoint.GLM_INFER, Query.Endpoint.CHAT_COMPLETIONS, Query.Endpoint.RESPONSES)


def claim(query_id, worker: str, model: str | None = None) -> Query | None:
    """Mark a queued query running and return its row as updated. None when another worker has it,
    or it is finished, or (given ``model``, the worker's) it is another model's.

    One statement, ``UPDATE .. RETURNING`` (PostgreSQL; SQLite 3.35+), where the ORM needs an
    UPDATE and then a SELECT: this is on every query's way to its first token."""
    from django.db import connection

    pk = Query._meta.pk
    where = [f"{connection.ops.quote_name(pk.column)} = %s", "status = %s"]
    params = [
        Query.Status.RUNNING,
        connection.ops.adapt_datetimefield_value(timezone.now()),
        worker,
        pk.get_db_prep_value(pk.to_python(query_id), connection),
        Query.Status.QUEUED,
    ]
    if model is not None:
        where.append("model = %s")
        params.append(model)
    sql = (
        f"UPDATE {connection.ops.quote_name(Query._meta.db_table)} SET status = %s, started_at = %s, worker = %s "
        f"WHERE {' AND '.join(where)} RETURNING *"
    )
    rows = list(Query.objects.raw(sql, params))
    return rows[0] if rows else None


def settle(query_id, *, query: Query | None = None, images: int | None = None) -> bool:
    """After a query's outcome is written: store its cost, refund its unused token and money
    reservations, free its concurrent slot, and add it (and its cost) to the usage rollup. Whoever
    ended the query calls this; the sweeper calls it again for a query whose ender died in between.
    Safe to repeat: the quota side refunds only the call that ends the reservation, and the rollup
    is added in the transaction that marks ``settled_at`` (where a ``no_images`` or ``metadata``
    query also loses what its mode does not keep)."""
    from django.db import transaction

    from accounts import quotas
    from inference import pricing, privacy, usage

    # ``query``: the row as its ender just wrote it (the runner, which also knows how many images
    # the model read), saving the reads on the way to the answer; else it is read here.
    if query is None:
        query = Query.objects.get(pk=query_id)
    if query.settled_at is not None or not query.is_finished:
        return False
    # Its cost at its model's price of its creation (inference/pricing.py); the same on every repeat.
    query.cost = pricing.query_cost(query, images=images)
    try:
        quotas.settle(query.api_key_id, query.pk, used=query.total_tokens or 0, cost=query.cost)
    except Exception:  # Redis down: the sweeper retries; the slot's lease bounds the damage meanwhile
        logger.exception("could not settle the quota of query %s", query_id)
        return False
    with transaction.atomic():
        settled = Query.objects.filter(pk=query_id, settled_at__isnull=True)
        now = timezone.now()
        if not settled.update(settled_at=now, cost=query.cost):
            return False
        query.settled_at = now
        usage.record_outcome(query)
        privacy.on_settle(query)  # what the tenant's privacy mode does not keep goes now
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
        events.signal_finished(query_id)
        if publisher is not None:
            publisher.publish(
                query_id, {"type": events.ERROR, "query_id": str(query_id), "code": code, "message": message}
            )
    return updated == 1


def usage_of(result: Result) -> dict:
    """OpenAI's usage object: the prompt counted once, the completion tokens of every choice."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": result.reasoning_tokens},
    }


def engine_request(query: Query) -> EngineRequest:
    """What the engine is asked, from the stored query: its conversation and images, and its params."""
    pictures = handoff.take(query.pk)  # the embedded default's request left them decoded
    if pictures is not None and len(pictures) == query.stored_images:
        messages = selectors.messages_of(query, len(pictures))
    else:
        messages, images = selectors.conversation_of(query)
        pictures = []
        for content in images:
            with Image.open(io.BytesIO(content)) as stored:
                pictures.append(stored.convert("RGB"))
    params = query.params
    sampling = SamplingParams(
        max_new_tokens=int(params.get("max_tokens", settings.DEFAULT_MAX_TOKENS)),
        temperature=params.get("temperature"),
        top_p=params.get("top_p"),
        top_k=params.get("top_k"),
        min_p=params.get("min_p", 0.0),
        repetition_penalty=params.get("repetition_penalty"),
        presence_penalty=params.get("presence_penalty", 0.0),
        frequency_penalty=params.get("frequency_penalty", 0.0),
        seed=params.get("seed"),
        stop=tuple(params.get("stop", ())),
        n=int(params.get("n", 1)),
        logprobs=bool(params.get("logprobs", False)),
        top_logprobs=int(params.get("top_logprobs", 0)),
        logit_bias=tuple((int(token), float(bias)) for token, bias in (params.get("logit_bias") or {}).items()),
    )
    return EngineRequest(
        messages=messages,
        images=pictures,
        sampling=sampling,
        tools=params.get("tools"),
        tool_choice=params.get("tool_choice"),
        response_format=params.get("response_format"),
        enable_thinking=bool(params.get("enable_thinking", False)),
    )


def _choice_record(choice: Choice, *, parallel_tool_calls: bool) -> dict:
    calls = choice.tool_calls if parallel_tool_calls else choice.tool_calls[:1]
    return {
        "index": choice.index,
        "text": choice.text,
        "reasoning": choice.reasoning,
        "tool_calls": [call.as_openai() for call in calls],
        "finish_reason": choice.finish_reason,
        "completion_tokens": choice.completion_tokens,
        "reasoning_tokens": choice.reasoning_tokens,
        "logprobs": choice.logprobs,
    }


class _Stream:
    """Coalesces a generation's deltas into at most one message per STREAM_COALESCE_SECONDS, in
    order, one entry per choice and kind: ``{"choice", "text", "reasoning", "tool_calls", "logprobs"}``.
    Sends nothing when ``enabled`` is off (a query nobody streams)."""

    def __init__(self, query_id, publisher: events.Publisher, *, parallel_tool_calls: bool, enabled: bool = True):
        self.query_id = query_id
        self.publisher = publisher
        self.parallel_tool_calls = parallel_tool_calls
        self.enabled = enabled
        self.pending: list[dict] = []
        self.calls_sent: dict[int, int] = {}
        self.last_flush = 0.0

    def add(self, delta: Delta) -> None:
        if not self.enabled:
            return
        calls = []
        for call in delta.tool_calls:
            sent = self.calls_sent.get(delta.index, 0)
            if sent and not self.parallel_tool_calls:
                continue
            calls.append(call.as_openai(index=sent))
            self.calls_sent[delta.index] = sent + 1
        last = self.pending[-1] if self.pending else None
        if last is not None and last["choice"] == delta.index and not calls and not last["tool_calls"]:
            last["text"] += delta.text
            last["reasoning"] += delta.reasoning
            last["logprobs"].extend(delta.logprobs)
        else:
            self.pending.append(
                {
                    "choice": delta.index,
                    "text": delta.text,
                    "reasoning": delta.reasoning,
                    "tool_calls": calls,
                    "logprobs": list(delta.logprobs),
                }
            )
        if time.monotonic() - self.last_flush >= settings.STREAM_COALESCE_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.publisher.publish(
                self.query_id, {"type": events.TOKEN, "query_id": str(self.query_id), "pieces": self.pending}
            )
            self.pending = []
        self.last_flush = time.monotonic()


def _release_connection() -> None:
    """Hand this thread's database connection back to the pool while the answer streams: a worker
    runs many queries at once (ENGINE_MAX_INFLIGHT with an engine server), each needing a connection
    only to claim and to finish. Without a pool the connection stays (no reconnect per query)."""
    from django.db import connection

    if connection.settings_dict.get("OPTIONS", {}).get("pool") and not connection.in_atomic_block:
        connection.close()


def execute(
    query_id,
    engine,
    publisher: events.Publisher,
    worker: str,
    should_stop: Callable[[], bool] | None = None,
    model: str | None = None,
    stream: bool = True,
) -> str | None:
    """Run one query to its outcome. Returns the final status, or None when it was not ours to run
    (claimed or finished already, or, given ``model``, another model's).

    ``stream`` off (the dispatcher's word: the caller only waits for the end, as the sync endpoints
    and async jobs do) publishes no ``started``, deltas or ``done``: the finished signal and the row
    are all such a caller reads. Errors are published whatever ``stream`` says (rare, and cheap)."""
    query = claim(query_id, worker, model)
    if query is None:
        logger.info("query %s is not queued for this worker's model any more; not running it here", query_id)
        return None
    if stream:
        publisher.publish(query_id, {"type": events.STARTED, "query_id": str(query_id)})
    parallel = bool(query.params.get("parallel_tool_calls", True))
    deltas = _Stream(query_id, publisher, parallel_tool_calls=parallel, enabled=stream)
    texts: dict[int, list[str]] = {}
    first_token_at = None

    try:
        request = engine_request(query)
        _release_connection()
        generation = engine.stream(request, should_stop=should_stop)
        for delta in generation:
            if first_token_at is None:
                first_token_at = timezone.now()
            texts.setdefault(delta.index, []).append(delta.text)
            deltas.add(delta)
        deltas.flush()
        result = generation.result
    except EngineError as exc:
        deltas.flush()
        fail(
            query_id,
            exc.code,
            exc.message,
            answer="".join(texts.get(0, [])),
            first_token_at=first_token_at,
            publisher=publisher,
        )
        return Query.Status.FAILED
    except Exception as exc:  # never leave a query running because of a bug
        logger.exception("query %s failed", query_id)
        deltas.flush()
        fail(query_id, "internal_error", f"Inference failed: {type(exc).__name__}", publisher=publisher)
        return Query.Status.FAILED

    choices = [_choice_record(choice, parallel_tool_calls=parallel) for choice in result.choices]
    first = choices[0]
    outcome = {
        "answer": first["text"],
        "reasoning": first["reasoning"],
        "tool_calls": first["tool_calls"],
        # Every choice (n > 1) and the logprobs are kept whole; a plain answer needs nothing more.
        "choices": choices if len(choices) > 1 or query.params.get("logprobs") else [],
        "finish_reason": first["finish_reason"],
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "reasoning_tokens": result.reasoning_tokens,
    }
    if first["finish_reason"] == "cancelled":
        fail(
            query_id,
            "cancelled",
            "The client cancelled the query.",
            first_token_at=first_token_at,
            publisher=publisher,
            **outcome,
        )
        return Query.Status.FAILED

    finished_at = timezone.now()
    ended = {
        "status": Query.Status.SUCCEEDED,
        "first_token_at": first_token_at or finished_at,
        "finished_at": finished_at,
        **outcome,
    }
    updated = Query.objects.filter(pk=query_id, status=Query.Status.RUNNING).update(**ended)
    if not updated:  # ended meanwhile by someone else (the sweeper): their outcome stands
        return None
    for field, value in ended.items():  # the row as written, for settle (no second read)
        setattr(query, field, value)
    settled = settle(query_id, query=query, images=len(request.images))
    # A sync request waits on the signal: it carries the row as settled, which the request then
    # need not read (not settled here: the row will change, the request reads it).
    carry = settled and not stream and query.endpoint in WAITED_ON
    events.signal_finished(query_id, row=query if carry else None)
    if not stream:
        return Query.Status.SUCCEEDED
    publisher.publish(
        query_id,
        {
            "type": events.DONE,
            "query_id": str(query_id),
            "result": first["text"],
            "reasoning": first["reasoning"],
            "tool_calls": first["tool_calls"],
            "choices": choices,
            "finish_reason": first["finish_reason"],
            "usage": usage_of(result),
            "cost_time": round((finished_at - query.created_at).total_seconds(), 3),
        },
    )
    return Query.Status.SUCCEEDED
