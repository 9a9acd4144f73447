"""OpenAI's Responses API, ``POST /v1/responses``: text and image input, ``instructions``,
``max_output_tokens``, sampling, structured output (``text.format``), thinking (``reasoning``),
plain or streamed as the SDK's ``client.responses.create`` expects. The same admission path as
every endpoint; logged as its own endpoint.

The input becomes a chat conversation (``instructions`` its system message) and goes through the
chat code, so limits, images and parameters behave exactly as in chat completions. What the
Responses API has and Sightline does not (server-side state: ``previous_response_id``,
``conversation``; built-in tools; function tools) is refused with ``unsupported_parameter``.
"""

import json

from django.http import StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework.response import Response

from config.errors import ApiError, error_body
from inference import events, parameters, services, validation
from inference.api import SUBMITS, KeyedAPIView, client_info, errors, with_rate_headers
from inference.chat import informational, parse_messages
from inference.models import Query
from inference.openai_api import choices_of
from inference.parsers import JSONObjectParser

HONOURED = {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "text",
    "reasoning",
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
}
# Accepted when they change nothing (SDK defaults), refused otherwise.
OFF = {
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True, False),
    "truncation": ("disabled",),
    "include": ([],),
    "background": (False,),
}


def _refuse_unsupported(body: dict) -> None:
    for field, value in body.items():
        if field in HONOURED or value is None or value in OFF.get(field, ()):
            continue
        raise ApiError(
            "unsupported_parameter",
            f"'{field[:64]}' is not supported by POST /v1/responses (Sightline keeps no server-side state "
            "and has no built-in tools; use /v1/chat/completions for function tools). Leave it out.",
            param=field[:64],
        )


def _part(part, where: str) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise validation.refuse(
                f"{where}.image_url", f"'{where}.image_url' must be a data URI (or an allowed URL)."
            )
        return {"type": "image_url", "image_url": {"url": url}}
    raise validation.refuse(where, f"'{where}' must be an input_text or input_image part.")


def _messages(body: dict) -> list[dict]:
    """The Responses input as chat messages: ``instructions`` first, as the system message."""
    messages = []
    instructions = validation.text(body.get("instructions"), "instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise validation.refuse("input", "'input' must be a string or a non-empty list of messages.")
    for index, item in enumerate(given):
        where = f"input[{index}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise validation.refuse(where, f'\'{where}\' must be a message ({{"role", "content"}}).')
        content = item.get("content")
        if isinstance(content, list):
            content = [_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
        messages.append({"role": item.get("role"), "content": content})
    return messages


def _format(body: dict) -> dict | None:
    """``text.format`` in chat's ``response_format`` shape."""
    text = validation.obj(body.get("text"), "text") or {}
    fmt = validation.obj(text.get("format"), "text.format")
    if fmt is None or fmt.get("type") != "json_schema":
        return fmt
    spec = {key: fmt[key] for key in ("name", "schema", "strict") if key in fmt}
    return {"type": "json_schema", "json_schema": spec}


def _response(query: Query, status: str, *, text: str = "", reasoning: str = "", usage=None) -> dict:
    items = []
    if reasoning:
        items.append(
            {
                "type": "reasoning",
                "id": f"rs_{query.pk.hex}",
                "summary": [{"type": "summary_text", "text": reasoning}],
            }
        )
    if status != "in_progress":
        items.append(
            {
                "type": "message",
                "id": f"msg_{query.pk.hex}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        )
    params = query.params
    return {
        "id": f"resp_{query.pk.hex}",
        "object": "response",
        "created_at": int(query.created_at.timestamp()),
        "status": status,
        "model": query.model,
        "output": items,
        "instructions": params.get("instructions"),
        "max_output_tokens": params.get("max_tokens"),
        "temperature": params.get("temperature"),
        "top_p": params.get("top_p"),
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "metadata": params.get("metadata") or {},
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "usage": usage,
    }


def _usage(query: Query) -> dict:
    return {
        "input_tokens": query.prompt_tokens or 0,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": query.completion_tokens or 0,
        "output_tokens_details": {"reasoning_tokens": query.reasoning_tokens or 0},
        "total_tokens": query.total_tokens or 0,
    }


def _status(query: Query) -> str:
    return "incomplete" if query.finish_reason == "length" else "completed"


class ResponsesView(KeyedAPIView):
    error_style = "openai"
    parser_classes = [JSONObjectParser]

    @extend_schema(
        operation_id="responses_create",
        summary="OpenAI Responses API (text and images in, text out)",
        description=(
            "`input` (a string or messages of `input_text`/`input_image` parts), `instructions`, "
            "`max_output_tokens`, `temperature`, `top_p`, `text.format` (json_schema/json_object), "
            "`reasoning.effort`, `stream` (SSE: response.created, response.output_text.delta, "
            "response.completed, ...). Server-side state and tools are refused (unsupported_parameter)."
        ),
        request=OpenApiTypes.OBJECT,
        responses={200: OpenApiTypes.OBJECT, **errors(*SUBMITS, 404, 502, 504, 507, style="openai")},
        tags=["openai"],
    )
    def post(self, request):
        body = request.data
        _refuse_unsupported(body)
        reasoning = validation.obj(body.get("reasoning"), "reasoning") or {}
        for key in reasoning:
            if key not in ("effort", "summary"):
                raise ApiError("unsupported_parameter", f"'reasoning.{key[:64]}' is not supported.", param="reasoning")
        chat_form = {
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "response_format": _format(body),
            "reasoning_effort": reasoning.get("effort"),
        }
        decoding = parameters.decoding(chat_form)
        chat = parse_messages(_messages(body))
        stream = validation.boolean(body.get("stream"), "stream")
        extra = {**decoding, **informational(body)}
        if body.get("instructions"):
            extra["instructions"] = body["instructions"]
        query = services.submit(
            request.auth,
            endpoint=Query.Endpoint.RESPONSES,
            client=client_info(request),
            model=body.get("model"),
            extra_params=extra,
            messages=chat.messages,
            images=chat.images,
            max_tokens=body.get("max_output_tokens"),
        )
        if stream:
            response = StreamingHttpResponse(self._events(query), content_type="text/event-stream")
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
            return with_rate_headers(response, query)
        done = services.run_sync_or_raise(query)
        choice = choices_of(done)[0]
        body = _response(done, _status(done), text=choice["text"], reasoning=choice["reasoning"], usage=_usage(done))
        return with_rate_headers(Response(body), query)

    async def _events(self, query: Query):
        """The Responses stream: typed SSE events with a sequence number, as the SDK reads them."""
        sequence = 0
        item_id = f"msg_{query.pk.hex}"

        def event(kind: str, **payload) -> str:
            nonlocal sequence
            data = {"type": kind, "sequence_number": sequence, **payload}
            sequence += 1
            return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

        text = []
        ended = False
        try:
            yield event("response.created", response=_response(query, "in_progress"))
            yield event("response.in_progress", response=_response(query, "in_progress"))
            opened = {**message_item(item_id), "status": "in_progress", "content": []}
            yield event("response.output_item.added", output_index=0, item=opened)
            part = {"type": "output_text", "text": "", "annotations": []}
            yield event("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part)
            async for message in services.follow(query):
                kind = message["type"]
                if kind == events.TOKEN:
                    for piece in message["pieces"]:
                        if piece["text"]:
                            text.append(piece["text"])
                            yield event(
                                "response.output_text.delta",
                                item_id=item_id,
                                output_index=0,
                                content_index=0,
                                delta=piece["text"],
                                logprobs=[],
                            )
                elif kind in (events.DONE, services.FINISHED):
                    ended = True
                    done = await services.afetch(query.pk)
                    if done.status != Query.Status.SUCCEEDED:
                        yield event("error", **error_body(services.error_of(done), "openai")["error"])
                        continue
                    choice = choices_of(done)[0]
                    full = {"type": "output_text", "text": choice["text"], "annotations": []}
                    yield event(
                        "response.output_text.done",
                        item_id=item_id,
                        output_index=0,
                        content_index=0,
                        text=choice["text"],
                        logprobs=[],
                    )
                    yield event(
                        "response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=full
                    )
                    item = {**message_item(item_id), "content": [full]}
                    yield event("response.output_item.done", output_index=0, item=item)
                    final = _response(
                        done, _status(done), text=choice["text"], reasoning=choice["reasoning"], usage=_usage(done)
                    )
                    kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
                    yield event(kind, response=final)
                elif kind == events.ERROR:
                    ended = True
                    error = error_body(ApiError(message["code"], message["message"], query_id=query.pk), "openai")
                    yield event("error", **error["error"])
        finally:
            if not ended:
                await services.acancel(query.pk)


def message_item(item_id: str) -> dict:
    return {"type": "message", "id": item_id, "status": "completed", "role": "assistant"}
