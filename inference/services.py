"""Business rules of a query: checking its input, accepting it, and waiting for its outcome.

Every endpoint goes through the same path: authenticate (DRF), check the input, write the
``Query`` row, dispatch after commit, then answer from the query's messages.
"""

import asyncio
import math
from dataclasses import dataclass

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.db import transaction

from config.errors import STATUS, ApiError
from inference import events
from inference.dispatch import get_dispatcher
from inference.images import CheckedImage, check_image
from inference.models import Query, QueryImage

# While waiting, the row is re-read this often when no message arrives: a lost message, or a
# query ended by someone else (the sweeper), still ends the wait.
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class InferenceInput:
    prompt: str
    image: CheckedImage
    max_tokens: int
    temperature: float
    top_p: float

    def params(self) -> dict:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}


@dataclass(frozen=True)
class ClientInfo:
    ip: str | None = None
    user_agent: str = ""


def _number(value, name: str, kind, low, high, default):
    if value is None or value == "":
        return default
    try:
        number = kind(value)
        if isinstance(value, bool) or (isinstance(number, float) and not math.isfinite(number)):
            raise ValueError
    except (TypeError, ValueError):
        raise ApiError("invalid_request", f"'{name}' must be a number.", param=name) from None
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ApiError("invalid_request", f"'{name}' must be a whole number.", param=name)
    if not low <= number <= high:
        raise ApiError("invalid_request", f"'{name}' must be between {low} and {high}; got {value}.", param=name)
    return number


def check_prompt(prompt) -> str:
    if prompt is None:
        raise ApiError("invalid_request", "'prompt' is required: the question to ask about the image.", param="prompt")
    if not isinstance(prompt, str):
        raise ApiError("invalid_request", "'prompt' must be a string.", param="prompt")
    if not prompt.strip():
        raise ApiError("invalid_request", "'prompt' must not be empty.", param="prompt")
    if len(prompt) > settings.MAX_PROMPT_CHARS:
        raise ApiError(
            "invalid_request",
            f"'prompt' is {len(prompt):,} characters; the limit is {settings.MAX_PROMPT_CHARS:,}.",
            param="prompt",
        )
    return prompt


def check_input(*, prompt, image_bytes: bytes | None, max_tokens=None, temperature=None, top_p=None) -> InferenceInput:
    """Check everything about a request before anything is spent on it. Raises ``ApiError``."""
    prompt = check_prompt(prompt)
    max_tokens = _number(max_tokens, "max_tokens", int, 1, settings.MAX_NEW_TOKENS, settings.DEFAULT_MAX_TOKENS)
    temperature = _number(temperature, "temperature", float, 0.0, 2.0, 0.0)
    top_p = _number(top_p, "top_p", float, 0.0, 1.0, 1.0)
    if image_bytes is None:
        raise ApiError("invalid_request", "'image' is required: a file upload, base64 or a data URI.", param="image")
    image = check_image(image_bytes)
    return InferenceInput(prompt=prompt, image=image, max_tokens=max_tokens, temperature=temperature, top_p=top_p)


def accept(api_key, data: InferenceInput, *, endpoint: str, client: ClientInfo | None = None) -> Query:
    """Write the query row (``queued``) and its normalised image, and commit. Nothing is dispatched yet."""
    client = client or ClientInfo()
    png = data.image.normalised_png()
    with transaction.atomic():
        query = Query.objects.create(
            tenant_id=api_key.tenant_id,
            api_key=api_key,
            model=settings.INFERENCE_MODEL_NAME,
            endpoint=endpoint,
            prompt=data.prompt,
            params=data.params(),
            image_sha256=data.image.sha256,
            image_format=data.image.format,
            image_width=data.image.width,
            image_height=data.image.height,
            image_bytes=data.image.size_bytes,
            client_ip=client.ip,
            user_agent=(client.user_agent or "")[:512],
        )
        QueryImage.objects.create(
            query=query, content=png, width=data.image.image.width, height=data.image.image.height
        )
    return query


def submit(api_key, *, endpoint: str, client: ClientInfo | None = None, **fields) -> Query:
    """The one admission path of every endpoint: input checks, then the committed ``queued`` row.

    (Authentication happened before, in DRF or the websocket consumer.) Nothing is dispatched yet:
    a caller that waits subscribes to the query's messages first, then dispatches.
    """
    return accept(api_key, check_input(**fields), endpoint=endpoint, client=client)


def cancel(query_id) -> None:
    """Ask the worker running a query to stop; it ends ``failed``/``cancelled`` with the partial answer."""
    get_dispatcher().cancel(query_id)


def dispatch(query: Query) -> None:
    """Hand a committed query to a worker."""
    get_dispatcher().submit(query.pk)


def _finished(query_id) -> bool:
    return Query.objects.filter(pk=query_id, status__in=[Query.Status.SUCCEEDED, Query.Status.FAILED]).exists()


async def dispatch_and_wait(query: Query, timeout: float) -> bool:
    """Subscribe to the query's messages, dispatch it, wait for its end. False on timeout."""
    loop_time = asyncio.get_running_loop().time
    deadline = loop_time() + timeout
    async with events.Subscription(query.pk) as subscription:
        await sync_to_async(dispatch, thread_sensitive=False)(query)
        while True:
            remaining = deadline - loop_time()
            if remaining <= 0:
                return False
            message = await subscription.next(min(POLL_SECONDS, remaining))
            if message is None:
                if await sync_to_async(_finished, thread_sensitive=False)(query.pk):
                    return True
            elif message["type"] in events.TERMINAL:
                return True


def run_sync(query: Query, timeout: float | None = None) -> Query:
    """Dispatch a committed query and wait for its outcome (the sync endpoints).

    Past ``timeout`` seconds this raises ``timeout``; the query goes on and can be polled.
    """
    timeout = settings.SYNC_TIMEOUT if timeout is None else timeout
    finished = async_to_sync(dispatch_and_wait)(query, timeout)
    if not finished:
        raise ApiError(
            "timeout",
            f"No answer within {timeout:g} s; the query goes on. Poll GET /v1/queries/{query.pk} for its outcome.",
            query_id=query.pk,
        )
    return Query.objects.get(pk=query.pk)


def error_of(query: Query) -> ApiError:
    """The API error for a failed query."""
    code = query.error_code if query.error_code in STATUS else "internal_error"
    return ApiError(code, query.error_message or "The query failed.", query_id=query.pk)


def usage(query: Query) -> dict:
    return {
        "prompt_tokens": query.prompt_tokens or 0,
        "completion_tokens": query.completion_tokens or 0,
        "total_tokens": query.total_tokens or 0,
    }
