"""The OpenAI-compatible API: ``POST /v1/chat/completions`` (plain and SSE streaming) and
``GET /v1/models``, so the official ``openai`` SDK works unchanged. Errors use OpenAI's shape."""

import json
import time

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework.response import Response

from config.errors import ApiError, error_body
from inference import events, parameters, services, validation
from inference.api import EXAMPLE_PNG, KEYED, SUBMITS, KeyedAPIView, client_info, errors, with_rate_headers
from inference.chat import informational, parse_messages, refuse_unsupported
from inference.models import Query
from inference.parsers import JSONObjectParser


def _completion_id(query: Query) -> str:
    return f"chatcmpl-{query.pk.hex}"


FINISH_REASONS = {"length": "length", "tool_calls": "tool_calls"}  # anything else ended normally: "stop"


def _finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, "stop")


def choices_of(query: Query) -> list[dict]:
    """Every choice of a finished query, as the runner recorded it."""
    if query.choices:
        return query.choices
    return [
        {
            "index": 0,
            "text": query.answer,
            "reasoning": query.reasoning,
            "tool_calls": query.tool_calls,
            "finish_reason": query.finish_reason,
            "logprobs": None,
        }
    ]


def _message(choice: dict) -> dict:
    """An assistant message in OpenAI's shape, with vLLM's ``reasoning_content`` beside the answer."""
    calls = choice.get("tool_calls") or []
    message = {
        "role": "assistant",
        "content": choice["text"] if choice["text"] or not calls else None,
        "reasoning_content": choice.get("reasoning") or None,
    }
    if calls:
        message["tool_calls"] = calls
    return message


def _logprobs(entries) -> dict | None:
    return None if entries is None else {"content": entries}


class ChatCompletionsView(KeyedAPIView):
    error_style = "openai"
    parser_classes = [JSONObjectParser]

    @extend_schema(
        operation_id="chat_completions",
        summary="OpenAI-compatible chat completion (a conversation, 0..MAX_IMAGES_PER_REQUEST images)",
        description=(
            "OpenAI's request. Each field is honoured (sampling, `n`, `stop`, `seed`, `logprobs`, "
            "`response_format`, `tools`/`tool_choice`, vLLM's `top_k`/`min_p`/`repetition_penalty`, "
            "`chat_template_kwargs.enable_thinking`), stored (`user`, `metadata`, `store`, `service_tier`) "
            "or refused with 400 `unsupported_parameter` naming it (and any unknown field); a refused field "
            "sent as null or with a value that changes nothing is accepted. The README's Parameters table "
            "lists every field."
        ),
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, **errors(*SUBMITS, 404, 502, 504, 507, style="openai")},
        examples=[
            OpenApiExample(
                "One image",
                value={
                    "model": "glm-4.6v-flash",
                    "max_tokens": 16,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "text", "text": "What is in this picture?"},
                                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + EXAMPLE_PNG}},
                            ],
                        }
                    ],
                },
                request_only=True,
                media_type="application/json",
            )
        ],
        tags=["openai"],
    )
    def post(self, request):
        body = request.data  # an object of clean text and finite numbers (JSONObjectParser)
        refuse_unsupported(body)  # before anything is admitted: no quota, no Query row
        options = validation.obj(body.get("stream_options"), "stream_options") or {}
        for key in options:
            if key != "include_usage":
                raise ApiError(
                    "unsupported_parameter",
                    f"'stream_options.{key[:64]}' is not supported; only include_usage is.",
                    param=f"stream_options.{key[:64]}",
                )
        decoding = parameters.decoding(body)
        extra = informational(body)
        chat = parse_messages(body.get("messages"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        stream = validation.boolean(body.get("stream"), "stream")
        include_usage = validation.boolean(options.get("include_usage"), "stream_options.include_usage")
        include_usage = include_usage and stream
        extra = {**decoding, **extra}
        query = services.submit(
            request.auth,
            endpoint=Query.Endpoint.CHAT_COMPLETIONS,
            client=client_info(request),
            model=body.get("model"),
            extra_params=extra,
            messages=chat.messages,
            images=chat.images,
            choices=decoding["n"],
            max_tokens=max_tokens,
        )
        if stream:
            response = StreamingHttpResponse(self._events(query, include_usage), content_type="text/event-stream")
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
            return with_rate_headers(response, query)
        done = services.run_sync_or_raise(query)
        return with_rate_headers(
            Response(
                {
                    "id": _completion_id(done),
                    "object": "chat.completion",
                    "created": int(done.created_at.timestamp()),
                    "model": done.model,
                    "choices": [
                        {
                            "index": choice["index"],
                            "message": _message(choice),
                            "finish_reason": _finish_reason(choice["finish_reason"]),
                            "logprobs": _logprobs(choice.get("logprobs")),
                        }
                        for choice in choices_of(done)
                    ],
                    "usage": services.usage(done),
                }
            ),
            query,
        )

    async def _events(self, query: Query, include_usage: bool):
        """SSE ``chat.completion.chunk`` events, then ``data: [DONE]``. A client that goes away cancels."""
        base = {
            "id": _completion_id(query),
            "object": "chat.completion.chunk",
            "created": int(query.created_at.timestamp()),
            "model": query.model,
        }
        n = int(query.params.get("n", 1))

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(index: int, delta: dict, finish_reason=None, logprobs=None) -> str:
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
            return event({**base, "choices": [choice], **({"usage": None} if include_usage else {})})

        ended = False
        try:
            for index in range(n):
                yield chunk(index, {"role": "assistant", "content": ""})
            async for message in services.follow(query):
                kind = message["type"]
                if kind == events.TOKEN:
                    for piece in message["pieces"]:
                        delta = {}
                        if piece["reasoning"]:
                            delta["reasoning_content"] = piece["reasoning"]
                        if piece["text"]:
                            delta["content"] = piece["text"]
                        if piece["tool_calls"]:
                            delta["tool_calls"] = piece["tool_calls"]
                        logprobs = _logprobs(piece["logprobs"]) if query.params.get("logprobs") else None
                        if delta or logprobs:
                            yield chunk(piece["choice"], delta, logprobs=logprobs)
                elif kind in (events.DONE, services.FINISHED):
                    ended = True
                    finished = await services.afetch(query.pk)
                    if finished.status != Query.Status.SUCCEEDED:
                        yield event(error_body(services.error_of(finished), "openai"))
                    else:
                        for choice in choices_of(finished):
                            yield chunk(choice["index"], {}, _finish_reason(choice["finish_reason"]))
                        if include_usage:
                            yield event({**base, "choices": [], "usage": services.usage(finished)})
                elif kind == events.ERROR:
                    ended = True
                    yield event(error_body(ApiError(message["code"], message["message"], query_id=query.pk), "openai"))
            yield "data: [DONE]\n\n"
        finally:
            if not ended:
                await services.acancel(query.pk)


def _model_object(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "sightline"}


def _usable_models(api_key) -> list[str]:
    return [m for m in services.served_models() if api_key.tenant.may_use(m)]


class ModelsView(KeyedAPIView):
    error_style = "openai"

    @extend_schema(
        operation_id="models_list",
        responses={200: OpenApiTypes.OBJECT, **errors(*KEYED, style="openai")},
        tags=["openai"],
    )
    def get(self, request):
        created = int(time.time())
        return Response({"object": "list", "data": [_model_object(m, created) for m in _usable_models(request.auth)]})


class ModelDetailView(KeyedAPIView):
    """``GET /v1/models/{id}``: the SDK's ``models.retrieve``; a model this key may not use is 404 as
    an unknown one is (never saying which)."""

    error_style = "openai"

    @extend_schema(
        operation_id="models_retrieve",
        responses={200: OpenApiTypes.OBJECT, **errors(*KEYED, 404, style="openai")},
        tags=["openai"],
    )
    def get(self, request, model_id):
        if model_id not in _usable_models(request.auth):
            shown = model_id if len(model_id) <= 100 else model_id[:100] + "..."
            raise ApiError(
                "model_not_found",
                f"The model '{shown}' does not exist or this key may not use it; GET /v1/models lists yours.",
                param="model",
            )
        return Response(_model_object(model_id, int(time.time())))
