"""The OpenAI-compatible API: ``POST /v1/chat/completions`` (plain and SSE streaming) and
``GET /v1/models``, so the official ``openai`` SDK works unchanged. Errors use OpenAI's shape."""

import json
import time

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework.response import Response

from config.errors import ApiError, error_body
from inference import events, services, validation
from inference.api import EXAMPLE_PNG, KEYED, SUBMITS, KeyedAPIView, client_info, errors, with_rate_headers
from inference.chat import informational, parse_messages, refuse_unsupported
from inference.models import Query
from inference.parsers import JSONObjectParser

# OpenAI's own bound on n: within it, n > 1 is a feature Sightline lacks yet (unsupported_parameter);
# beyond it, a bad value (invalid_request).
MAX_OPENAI_N = 128


def _completion_id(query: Query) -> str:
    return f"chatcmpl-{query.pk.hex}"


def _usage(values: dict) -> dict:
    return {
        "prompt_tokens": values.get("prompt_tokens", 0),
        "completion_tokens": values.get("completion_tokens", 0),
        "total_tokens": values.get("total_tokens", 0),
    }


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class ChatCompletionsView(KeyedAPIView):
    error_style = "openai"
    parser_classes = [JSONObjectParser]

    @extend_schema(
        operation_id="chat_completions",
        summary="OpenAI-compatible chat completion (a conversation, 0..MAX_IMAGES_PER_REQUEST images)",
        description=(
            "OpenAI's request. Each field is honoured, stored (`user`, `metadata`, `store`, `service_tier`) "
            "or refused with 400 `unsupported_parameter` naming it (`stop`, `seed`, `tools`, ..., and any "
            "unknown field); a refused field sent as null or with a value that changes nothing is accepted. "
            "The README's Parameters table lists every field."
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
        if validation.number(body.get("n"), "n", int, 1, MAX_OPENAI_N, 1) != 1:
            raise ApiError(
                "unsupported_parameter",
                "'n' greater than 1 is not supported yet; send n=1 (or leave it out).",
                param="n",
            )
        options = validation.obj(body.get("stream_options"), "stream_options") or {}
        for key in options:
            if key != "include_usage":
                raise ApiError(
                    "unsupported_parameter",
                    f"'stream_options.{key[:64]}' is not supported; only include_usage is.",
                    param=f"stream_options.{key[:64]}",
                )
        extra = informational(body)
        chat = parse_messages(body.get("messages"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        stream = validation.boolean(body.get("stream"), "stream")
        include_usage = validation.boolean(options.get("include_usage"), "stream_options.include_usage")
        include_usage = include_usage and stream
        query = services.submit(
            request.auth,
            endpoint=Query.Endpoint.CHAT_COMPLETIONS,
            client=client_info(request),
            model=body.get("model"),
            extra_params=extra,
            messages=chat.messages,
            images=chat.images,
            max_tokens=max_tokens,
            temperature=body.get("temperature"),
            top_p=body.get("top_p"),
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
                            "index": 0,
                            "message": {"role": "assistant", "content": done.answer},
                            "finish_reason": _finish_reason(done.finish_reason),
                            "logprobs": None,
                        }
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

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(delta: dict, finish_reason=None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return event({**base, "choices": [choice], **({"usage": None} if include_usage else {})})

        ended = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for message in services.follow(query):
                kind = message["type"]
                if kind == events.TOKEN:
                    yield chunk({"content": message["text"]})
                elif kind in (events.DONE, services.FINISHED):
                    ended = True
                    finished = await services.afetch(query.pk)
                    if finished.status != Query.Status.SUCCEEDED:
                        yield event(error_body(services.error_of(finished), "openai"))
                    else:
                        yield chunk({}, _finish_reason(finished.finish_reason))
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
