"""Business rules of a query: checking its input, accepting it, and waiting for its outcome.

Every endpoint goes through the same path: authenticate (DRF), check the input, write the
``Query`` row, dispatch after commit, then answer from the query's messages.
"""

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, transaction

from accounts import quotas
from config import models_registry, money, shutdown
from config.errors import STATUS, ApiError
from inference import chat, events, handoff, imagestore, pricing, runner, validation
from inference.dispatch import get_dispatcher
from inference.engine import tiny_model
from inference.images import CheckedImage, check_image
from inference.models import Query, QueryImage

logger = logging.getLogger("sightline.services")

# While waiting, the row is re-read this often when no message arrives: a lost message, or a
# query ended by someone else (the sweeper), still ends the wait.
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class InferenceInput:
    """A request that passed every check: its conversation, its images in order, how to decode."""

    messages: list  # the chat template's form; the k-th {"type": "image"} part is images[k]
    prompt: str  # the last user turn's text, for the query log
    images: list[CheckedImage]
    max_tokens: int
    temperature: float
    top_p: float

    def params(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}


@dataclass(frozen=True)
class ClientInfo:
    ip: str | None = None
    user_agent: str = ""


def check_prompt(prompt) -> str:
    """The question of a prompt-and-images request (``/v1/glm/infer``, ``/v1/queries``, the websocket)."""
    if prompt is None:
        raise ApiError(
            "invalid_request", "'prompt' is required: the question (about the images, if any).", param="prompt"
        )
    prompt = validation.text(prompt, "prompt")
    if not prompt.strip():
        raise ApiError("invalid_request", "'prompt' must not be empty.", param="prompt")
    return prompt


@dataclass(frozen=True)
class Conversation:
    """A request's checked conversation, before its images are looked at."""

    messages: list  # the chat template's form (inference/chat.py)
    prompt: str  # the last user turn's text
    texts: list[str]  # what the template renders of each message: what the limits count
    image_params: list[str]  # the request field of each image, in order, for its errors


def check_conversation(*, messages: list | None = None, prompt=None, images: int = 0, served=None) -> Conversation:
    """Either ``messages`` (the template form, as ``chat.parse_messages`` makes it) or a ``prompt``
    asked about ``images`` images (one user message: the images, then the text). Bounded as a
    whole (characters, tokens, images; ``served``: the registry entry of the model asked for, whose
    limits and tokenizer apply) before admission spends anything."""
    if messages is None:
        validation.check_image_count(images, field="image", served=served)
        prompt = check_prompt(prompt)
        messages = chat.one_turn(prompt, images)
        field = "prompt"
        image_params = ["image"] if images == 1 else [f"image[{k}]" for k in range(images)]
    else:
        field = "messages"
        places = chat.image_places(messages)
        if len(places) != images:  # a caller's bug, never a client's
            raise ValueError(f"the conversation has {len(places)} image parts for {images} images")
        prompt = chat.last_user_text(messages)
        image_params = [f"messages[{i}].content[{j}]" for i, j in places]
    texts = [chat.text_of(message) for message in messages]
    validation.check_conversation_size(texts, images=images, field=field, served=served)
    return Conversation(messages=messages, prompt=prompt, texts=texts, image_params=image_params)


@dataclass(frozen=True)
class Params:
    """A request's checked decoding numbers."""

    max_tokens: int
    temperature: float
    top_p: float


def check_params(*, max_tokens=None, temperature=None, top_p=None, served=None) -> Params:
    """The cheap checks, run before admission spends anything. Numbers are JSON numbers; multipart
    forms convert theirs with ``validation.form_number`` first. ``served``: the registry entry of
    the model asked for, whose max_new_tokens bounds max_tokens."""
    ceiling = settings.MAX_NEW_TOKENS if served is None else min(settings.MAX_NEW_TOKENS, served.max_new_tokens)
    return Params(
        max_tokens=validation.number(
            max_tokens, "max_tokens", int, 1, ceiling, min(settings.DEFAULT_MAX_TOKENS, ceiling)
        ),
        temperature=validation.temperature(temperature),
        top_p=validation.number(top_p, "top_p", float, 0.0, 1.0, 1.0),
    )


def check_images(images: Sequence[bytes], *, params: Sequence[str]) -> list[CheckedImage]:
    """Each image decoded and normalised, in order; an error names the image's field."""
    return [check_image(data, param=param) for data, param in zip(images, params, strict=True)]


def _input(conversation: Conversation, params: Params, images: list[CheckedImage]) -> InferenceInput:
    return InferenceInput(
        messages=conversation.messages,
        prompt=conversation.prompt,
        images=images,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
    )


def check_input(
    *,
    messages: list | None = None,
    prompt=None,
    images: Sequence[bytes] = (),
    max_tokens=None,
    temperature=None,
    top_p=None,
) -> InferenceInput:
    """Check everything about a request before anything is spent on it. Raises ``ApiError``."""
    conversation = check_conversation(messages=messages, prompt=prompt, images=len(images))
    params = check_params(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    return _input(conversation, params, check_images(images, params=conversation.image_params))


def served_models() -> list[str]:
    """The public names of the registered models (config/models_registry.py), in its order."""
    return models_registry.names()


def serves_tiny_model() -> bool:
    """Whether this process's model is the random test model of build_tiny_model (pages then say
    its answers are noise)."""
    return tiny_model.is_tiny_model(models_registry.own().model)


def _model_not_found(model: str) -> ApiError:
    shown = model if len(model) <= 100 else model[:100] + "..."
    return ApiError(
        "model_not_found",
        f"The model '{shown}' does not exist or this key may not use it; GET /v1/models lists yours.",
        param="model",
    )


def check_model(api_key, model: str | None) -> str:
    """The model a request asks for, if the platform serves it and the key's tenant may use it.
    Left out: this process's model (INFERENCE_MODEL_NAME) if the tenant may use it, else the first
    registered model it may use."""
    model = validation.text(model, "model")
    if model in (None, ""):
        usable = [m for m in served_models() if api_key.tenant.may_use(m)]
        if not usable:
            raise ApiError(
                "model_not_found",
                "This key's tenant may use none of the models served here; GET /v1/models lists yours.",
                param="model",
            )
        return settings.INFERENCE_MODEL_NAME if settings.INFERENCE_MODEL_NAME in usable else usable[0]
    if model not in served_models() or not api_key.tenant.may_use(model):
        raise _model_not_found(model)
    return model


def accept(
    api_key,
    data: InferenceInput,
    *,
    endpoint: str,
    client: ClientInfo | None = None,
    admission=None,
    price: money.Price | None = None,
    model: str | None = None,
    extra_params: dict | None = None,
) -> Query:
    """Write the query row (``queued``), its conversation and its normalised images (one row each,
    in order, each image's PNG in image storage), and commit. Nothing is dispatched yet.

    The images are stored whatever the tenant's privacy mode: the worker reads them to run the
    query. In ``no_images`` and ``metadata`` mode they are removed when the query settles
    (inference/privacy.py). ``price``: the model's price at the admission's instant, recorded on
    the row with it."""
    client = client or ClientInfo()
    pngs = [image.normalised_png() for image in data.images]  # before the transaction: no lock held meanwhile
    keys = [imagestore.key_for(api_key.tenant_id, png) for png in pngs]
    identity = (
        {
            "id": admission.id,
            "created_at": admission.at,
            "reserved_tokens": admission.reserved_tokens,
            "reserved_cost": admission.reserved_cost,
        }
        if admission
        else {}
    )
    if admission and price is not None:  # the price at created_at: settlement need not read it again
        identity.update(pricing.recorded(price))
    try:
        query = _write(api_key, data, endpoint, client, admission, model, extra_params, identity, pngs, keys)
    except BaseException:
        if keys:  # objects this call wrote that no row refers to (the transaction rolled back)
            try:
                imagestore.release(keys)
            except Exception:
                logger.warning("could not delete the images of a query that was not written", exc_info=True)
        raise
    handoff.give(query.pk, [image.image for image in data.images])  # embedded: to its worker thread, decoded
    return query


def _write(api_key, data, endpoint, client, admission, model, extra_params, identity, pngs, keys) -> Query:
    with transaction.atomic():
        # The objects first, under their keys' locks (held until the commit), then the rows that
        # refer to them: an object is never deleted under a new reference (inference/imagestore.py).
        imagestore.lock_keys(keys, exclusive=False)
        for key, png in zip(keys, pngs, strict=True):
            imagestore.put(key, png)
        query = Query.objects.create(
            **identity,
            tenant_id=api_key.tenant_id,
            api_key=api_key,
            model=model or settings.INFERENCE_MODEL_NAME,
            endpoint=endpoint,
            prompt=data.prompt,
            messages=data.messages,
            params={**data.params(), **(extra_params or {})},
            client_ip=client.ip,
            user_agent=(client.user_agent or "")[:512],
            privacy_mode=api_key.tenant.privacy_mode,
            stored_images=len(keys),
        )
        QueryImage.objects.bulk_create(
            QueryImage(
                query=query,
                position=position,
                sha256=image.sha256,
                format=image.format,
                size_bytes=image.size_bytes,
                width=image.width,
                height=image.height,
                key=key,
                stored_bytes=len(png),
            )
            for position, (image, png, key) in enumerate(zip(data.images, pngs, keys, strict=True))
        )
        if admission:
            # Last, just before the commit: the admission's slot now lasts the query. If the
            # process dies before this, the admission's short lease frees the slot and the
            # sweeper refunds its reservation (no row); if after, the row is there to settle it.
            quotas.commit(admission)
    return query


def submit(
    api_key,
    *,
    endpoint: str,
    messages: list | None = None,
    prompt=None,
    images: Sequence[bytes] = (),
    max_tokens=None,
    temperature=None,
    top_p=None,
    client: ClientInfo | None = None,
    model: str | None = None,
    extra_params: dict | None = None,
    choices: int = 1,
) -> Query:
    """The one admission path of every endpoint: model, input checks, quotas, images, then the
    committed row.

    The conversation is ``messages`` (the template form of ``chat.parse_messages``, its k-th image
    part standing for ``images[k]``), or a ``prompt`` asked about ``images`` (0..N). Authentication
    happened before (DRF, or the websocket consumer). The cheap checks run first, so a refused
    request spends no quota; quotas then admit it (reserving for its text and images), and only
    then are the images decoded; if one is refused, the reservation is given back. Nothing is
    dispatched yet: a caller that waits subscribes to the query's messages first. The returned
    query carries ``rate_limit_headers`` for the response.
    """
    model = check_model(api_key, model)
    served = models_registry.get(model)
    conversation = check_conversation(messages=messages, prompt=prompt, images=len(images), served=served)
    params = check_params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, served=served)
    # n choices may each write max_tokens: the reservation covers them all. The budgets reserve its
    # worst-case cost at its model's price of this instant, which becomes the row's created_at.
    at = quotas.now()
    price = pricing.price_at(model, at)
    admission = quotas.admit(
        api_key,
        prompt="\n".join(conversation.texts),
        images=len(images),
        max_tokens=params.max_tokens * choices,
        model=model,
        endpoint=endpoint,
        price=price,
        at=at,
    )
    try:
        data = _input(conversation, params, check_images(images, params=conversation.image_params))
        query = accept(
            api_key,
            data,
            endpoint=endpoint,
            client=client,
            admission=admission,
            price=price,
            model=model,
            extra_params=extra_params,
        )
    except BaseException as exc:
        try:
            quotas.settle(api_key.pk, admission.id, used=0)
        except Exception:  # Redis unreachable: the admission's lease and the sweeper give it back
            logger.warning("could not give back the admission %s", admission.id, exc_info=True)
        if isinstance(exc, ApiError):
            exc.headers = {**admission.headers, **exc.headers}
        raise
    query.rate_limit_headers = admission.headers
    return query


_publisher = None


def _get_publisher() -> events.Publisher:
    global _publisher
    _publisher = _publisher or events.Publisher()
    return _publisher


def cancel(query_id) -> None:
    """Stop a query. A running one is stopped by its worker within a token or two and ends
    ``failed``/``cancelled`` with its partial answer; a queued one ends so at once."""
    get_dispatcher().cancel(query_id)
    if Query.objects.filter(pk=query_id, status=Query.Status.QUEUED).exists():
        runner.fail(
            query_id,
            "cancelled",
            "The client cancelled the query before it started.",
            publisher=_get_publisher(),
            statuses=(Query.Status.QUEUED,),
        )


def dispatch(query: Query, *, queue_without_worker: bool = False, stream: bool = True) -> None:
    """Hand a committed query to a worker of its model (its model's queue).

    A caller that waits for the answer (sync endpoints, SSE, the websocket) learns at once that no
    worker has the model loaded: the query ends ``model_unavailable`` (503) instead of waiting out
    its timeout. An async job (``queue_without_worker``) stays queued for a worker to come, until
    MAX_QUEUED_SECONDS. ``stream`` off: the caller reads only the end (the finished signal and the
    row), so the worker publishes no deltas."""
    dispatcher = get_dispatcher()
    reason = None if queue_without_worker else dispatcher.unavailable(query.model)
    if reason is not None:
        runner.fail(query.pk, "model_unavailable", reason, publisher=_get_publisher())
        return
    dispatcher.submit(query.pk, query.model, stream=stream)


def _finished(query_id) -> bool:
    return Query.objects.filter(pk=query_id, status__in=[Query.Status.SUCCEEDED, Query.Status.FAILED]).exists()


# Sent by ``follow`` when the row says the query ended but its last message never came.
FINISHED = "query.finished"
# How long ``follow`` keeps listening after the row says the query ended, before it gives up on
# the messages: the worker writes the row before it publishes ``done``, and under load the web
# process's receive loop delivered a whole answer's deltas ~1 s after the worker sent them (SSE at
# concurrency 32 on 2 cores). Ending at the first look at the row streamed those answers empty.
FINISHED_GRACE_SECONDS = 5.0
# A client told to come back during a shutdown retries after this many seconds (another process).
SHUTDOWN_RETRY_AFTER_SECONDS = 2


def shutdown_error(query_id) -> ApiError:
    """What a client waiting for a query hears when this web process shuts down (SIGTERM)."""
    return ApiError(
        "service_unavailable",
        f"This server is shutting down; the query goes on. Poll GET /v1/queries/{query_id} for its outcome.",
        query_id=query_id,
        headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_SECONDS)},
    )


async def follow(query: Query, timeout: float | None = None):
    """Subscribe to the query's messages, dispatch it, and yield its messages until it ends.

    Ends after ``query.done`` / ``query.error`` (or ``FINISHED`` when the row shows an end and no
    message came for FINISHED_GRACE_SECONDS since: the last messages were lost); stops silently
    once ``timeout`` seconds have passed. When the process starts shutting down it ends with a
    ``query.error`` of code ``service_unavailable`` flagged ``shutdown``: the client is told to
    poll, and the query is not cancelled (it goes on).
    """
    loop_time = asyncio.get_running_loop().time
    deadline = None if timeout is None else loop_time() + timeout
    ended_at = None  # when the row was first seen ended while its last message had not come
    async with events.Subscription(query.pk) as subscription:
        await sync_to_async(dispatch, thread_sensitive=False)(query)
        while True:
            if shutdown.in_progress():  # checked at least every POLL_SECONDS
                error = shutdown_error(query.pk)
                yield {
                    "type": events.ERROR,
                    "code": error.code,
                    "message": error.message,
                    "query_id": str(query.pk),
                    "shutdown": True,
                }
                return
            wait = POLL_SECONDS
            if deadline is not None:
                wait = min(wait, deadline - loop_time())
                if wait <= 0:
                    return
            message = await subscription.next(wait)
            if message is None:
                if ended_at is None:
                    if await sync_to_async(_finished, thread_sensitive=False)(query.pk):
                        ended_at = loop_time()
                elif loop_time() - ended_at >= FINISHED_GRACE_SECONDS:
                    yield {"type": FINISHED, "query_id": str(query.pk)}
                    return
                continue
            yield message
            if message["type"] in events.TERMINAL:
                return


def wait_finished(query_id, timeout: float) -> events.Finished | None:
    """Wait for the query's end: its finished signal (inference/events.py), with a look at the row
    every POLL_SECONDS in case the signal was lost. None when ``timeout`` passed first; raises
    ``service_unavailable`` when the process shuts down first (the query goes on)."""
    deadline = time.monotonic() + timeout
    while True:
        if shutdown.in_progress():  # checked at least every POLL_SECONDS
            raise shutdown_error(query_id)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            finished = events.wait_finished(query_id, min(POLL_SECONDS, left))
            if finished is not None:
                return finished
        except Exception:  # noqa: BLE001 - Redis away: the row says when it ends
            logger.warning("could not wait for the end of query %s; reading its row", query_id, exc_info=True)
            time.sleep(min(POLL_SECONDS, max(left, 0)))
        if _finished(query_id):
            return events.Finished()


def run_sync(query: Query, timeout: float | None = None) -> Query:
    """Dispatch a committed query and wait for its outcome (the sync endpoints).

    Past ``timeout`` seconds this raises ``timeout``, and when the process shuts down meanwhile
    ``service_unavailable`` with ``Retry-After``; either way the query goes on and can be polled.
    The wait blocks this request's thread on one Redis read (no event loop, no channel layer), and
    the row usually comes with the signal (else it is read).
    """
    timeout = settings.SYNC_TIMEOUT if timeout is None else timeout
    dispatch(query, stream=False)
    if not connection.in_atomic_block:
        connection.close()  # give the connection back to its pool while waiting (config/sqlite_pool for SQLite)
    finished = wait_finished(query.pk, timeout)
    if finished is None:
        raise ApiError(
            "timeout",
            f"No answer within {timeout:g} s; the query goes on. Poll GET /v1/queries/{query.pk} for its outcome.",
            query_id=query.pk,
        )
    return finished.row if finished.row is not None else Query.objects.get(pk=query.pk)


def run_sync_or_raise(query: Query, timeout: float | None = None) -> Query:
    """``run_sync``, then the query's error raised if it failed; rate-limit headers ride on errors."""
    headers = getattr(query, "rate_limit_headers", {})
    try:
        done = run_sync(query, timeout)
    except ApiError as error:
        error.headers = {**headers, **error.headers}
        raise
    if done.status != Query.Status.SUCCEEDED:
        error = error_of(done)
        error.headers = dict(headers)
        raise error
    return done


async def afetch(query_id) -> Query:
    return await Query.objects.aget(pk=query_id)


async def acancel(query_id) -> None:
    await sync_to_async(cancel, thread_sensitive=False)(query_id)


def error_of(query: Query) -> ApiError:
    """The API error for a failed query."""
    code = query.error_code if query.error_code in STATUS else "internal_error"
    return ApiError(code, query.error_message or "The query failed.", query_id=query.pk)


def usage(query: Query) -> dict:
    """OpenAI's usage object (the completion tokens of every choice; the reasoning among them)."""
    return {
        "prompt_tokens": query.prompt_tokens or 0,
        "completion_tokens": query.completion_tokens or 0,
        "total_tokens": query.total_tokens or 0,
        "completion_tokens_details": {"reasoning_tokens": query.reasoning_tokens or 0},
    }
