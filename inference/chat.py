"""OpenAI-style chat requests: turning ``messages`` into what the engine and the query log take.

A request is a conversation: system (and developer, read as system), user, assistant and tool
messages, with 0..MAX_IMAGES_PER_REQUEST images in its user messages (``image_url`` parts, as data
URIs; remote URLs only from hosts in IMAGE_URL_ALLOWED_HOSTS), text and images in any order.
Assistant messages may carry ``tool_calls`` (their content then may be null) and
``reasoning_content``; tool messages carry ``tool_call_id`` and text. The result is the chat
template's form of ``inference/engine/request.py``: each message and each part kept in its place
(so ``messages[i].content[j]`` names the same thing in the request and in the stored
conversation), image parts as ``{"type": "image"}`` placeholders standing for the images in order.
"""

import json
from dataclasses import dataclass

from django.conf import settings
from django.http import QueryDict

from config.errors import ApiError
from inference import validation
from inference.images import decode_base64_image, fetch_image_url

ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


@dataclass(frozen=True)
class ChatRequest:
    messages: list  # chat-template messages, each image as a {"type": "image"} placeholder
    prompt: str  # the last user turn's text, for the query log
    all_text: str  # every message's text, to bound the prompt's tokens
    images: list[bytes]  # the images' bytes, in the order of their placeholders


def _refuse(where: str, message: str) -> ApiError:
    return ApiError("invalid_request", message, param=where)


def _parts(content, where: str) -> list:
    """The template parts of a user/system/assistant ``content``: text and image_url parts, in order
    (an image part keeps its URL under ``url`` until ``parse_messages`` takes it out)."""
    if isinstance(content, str):
        return [{"type": "text", "text": validation.clean_text(content, where)}]
    if not isinstance(content, list):
        raise _refuse(where, f"'{where}' must be a string or a list of parts.")
    parts = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": validation.text(part.get("text"), f"{here}.text", required=True)})
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise _refuse(f"{here}.image_url", f"'{here}.image_url.url' is required (a string).")
            parts.append({"type": "image", "url": validation.clean_text(url, f"{here}.image_url")})
        else:
            raise _refuse(here, f"'{here}' must be a 'text' or an 'image_url' part.")
    return parts


def _tool_calls(value, where: str) -> list:
    """OpenAI's ``tool_calls``: ``[{"id", "type": "function", "function": {"name", "arguments"}}]``,
    ``arguments`` a JSON object as text (the chat template renders its keys)."""
    if not isinstance(value, list) or not value:
        raise _refuse(where, f"'{where}' must be a non-empty list of tool calls (or left out).")
    calls = []
    for k, call in enumerate(value):
        here = f"{where}[{k}]"
        if not isinstance(call, dict):
            raise _refuse(here, f"'{here}' must be an object {{id, type: 'function', function: {{name, arguments}}}}.")
        call_id = validation.text(call.get("id"), f"{here}.id", required=True)
        if call.get("type", "function") != "function":
            raise _refuse(f"{here}.type", f"'{here}.type' must be 'function'.")
        function = call.get("function")
        if not isinstance(function, dict):
            raise _refuse(f"{here}.function", f"'{here}.function' must be an object {{name, arguments}}.")
        name = validation.text(function.get("name"), f"{here}.function.name", required=True)
        if not name:
            raise _refuse(f"{here}.function.name", f"'{here}.function.name' must not be empty.")
        arguments = validation.text(function.get("arguments"), f"{here}.function.arguments", required=True)
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise _refuse(
                f"{here}.function.arguments",
                f"'{here}.function.arguments' must be a JSON object as a string, like '{{\"city\": \"Paris\"}}'.",
            )
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def _message(message, index: int) -> dict:
    """One request message in the template's form, checked."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _refuse(where, f"'{where}' must be an object.")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise _refuse(f"{where}.role", f"'{where}.role' must be one of {', '.join(ROLES)}.")
    validation.text(message.get("name"), f"{where}.name")
    role = ROLES[role]
    content = message.get("content")
    if role == "tool":
        # The template renders a tool result as text (GLM: inside <tool_response>), so it is one string.
        call_id = validation.text(message.get("tool_call_id"), f"{where}.tool_call_id", required=True)
        parts = _parts(content, f"{where}.content")
        if any(p["type"] == "image" for p in parts):
            raise _refuse(f"{where}.content", f"'{where}.content' of a tool message must be text.")
        return {"role": "tool", "tool_call_id": call_id, "content": "".join(p["text"] for p in parts)}
    converted: dict = {"role": role}
    if role == "assistant":
        tool_calls = message.get("tool_calls")
        if tool_calls is not None:
            converted["tool_calls"] = _tool_calls(tool_calls, f"{where}.tool_calls")
        reasoning = validation.text(message.get("reasoning_content"), f"{where}.reasoning_content")
        if reasoning is not None:
            converted["reasoning_content"] = reasoning
        if content is None and tool_calls is not None:
            content = []  # OpenAI's null content beside tool calls: no text
    if content is None:
        raise _refuse(f"{where}.content", f"'{where}.content' is required (a string or a list of parts).")
    converted["content"] = _parts(content, f"{where}.content")
    if role != "user" and any(p["type"] == "image" for p in converted["content"]):
        raise _refuse(where, f"Images may only be sent in user messages; '{where}' is a {role} message.")
    return {"role": converted.pop("role"), "content": converted.pop("content"), **converted}


def text_of(message: dict) -> str:
    """Everything of a template message the chat template renders as text: its text parts, its
    reasoning, its tool calls' names and arguments, a tool's result. What the limits count."""
    content = message.get("content")
    pieces = [content] if isinstance(content, str) else [p["text"] for p in content or () if p["type"] == "text"]
    if message.get("reasoning_content"):
        pieces.append(message["reasoning_content"])
    for call in message.get("tool_calls") or ():
        pieces.extend((call["function"]["name"], call["function"]["arguments"]))
    return "".join(pieces)


def last_user_text(messages: list) -> str:
    """The last user turn's text (the query log's ``prompt``); "" when there is none."""
    for message in reversed(messages):
        if message["role"] == "user":
            return text_of(message)
    return ""


def turns(messages: list) -> list[dict]:
    """A stored conversation for people to read: each message's role and text, its images as
    ``[image #k]`` and its tool calls as ``name(arguments)`` (the dashboard's and admin's pages)."""
    shown, rank = [], 0
    for message in messages or ():
        content = message.get("content")
        pieces = []
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content or ():
            if part.get("type") == "image":
                pieces.append(f"[image #{rank}]")
                rank += 1
            else:
                pieces.append(part.get("text", ""))
        for call in message.get("tool_calls") or ():
            pieces.append(f"{call['function']['name']}({call['function']['arguments']})")
        role = message.get("role", "")
        if message.get("tool_call_id"):
            role = f"{role} ({message['tool_call_id']})"
        shown.append({"role": role, "text": " ".join(p for p in pieces if p)})
    return shown


def _json_text(call: dict) -> str:
    arguments = call["function"]["arguments"]
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def turn_parts(messages: list) -> list[dict]:
    """A stored conversation for a page to lay out: each message's role, its parts in order (text,
    or an image by its rank: the query's image at that position), its reasoning, its tool calls
    (name and arguments) and, for a tool's result, the call it answers."""
    shown, rank = [], 0
    for message in messages or ():
        content = message.get("content")
        parts = []
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content or ():
            if part.get("type") == "image":
                parts.append({"type": "image", "rank": rank})
                rank += 1
            elif part.get("text"):
                parts.append({"type": "text", "text": part["text"]})
        shown.append(
            {
                "role": message.get("role", ""),
                "parts": parts,
                "reasoning": message.get("reasoning_content") or "",
                "tool_calls": [
                    {"id": call.get("id", ""), "name": call["function"]["name"], "arguments": _json_text(call)}
                    for call in message.get("tool_calls") or ()
                ],
                "tool_call_id": message.get("tool_call_id") or "",
            }
        )
    return shown


def image_places(messages: list) -> list[tuple[int, int]]:
    """Where each image part of a template conversation is, in order: (message, part) indices."""
    return [
        (i, j)
        for i, message in enumerate(messages)
        if isinstance(message.get("content"), list)
        for j, part in enumerate(message["content"])
        if part["type"] == "image"
    ]


def one_turn(prompt: str, images: int) -> list:
    """The conversation of a prompt-and-images request: one user message, the images first (in
    their order), then the question, as GLM's own examples put them."""
    parts = [{"type": "image"} for _ in range(images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


def parse_messages(messages) -> ChatRequest:
    """The checked conversation of an OpenAI ``messages`` list, its images decoded (not yet checked
    as pictures: that is ``services``' work, after admission). The image count is bounded here,
    before any image is decoded; the conversation's characters and tokens by ``services`` before
    admission (``validation.check_conversation_size``)."""
    if not isinstance(messages, list) or not messages:
        raise _refuse("messages", "'messages' must be a non-empty list.")
    converted = [_message(message, index) for index, message in enumerate(messages)]
    places = image_places(converted)
    validation.check_image_count(len(places), field="messages")
    images = []
    for i, j in places:
        where = f"messages[{i}].content[{j}].image_url"
        url = converted[i]["content"][j].pop("url")
        if url.lower().startswith(("http://", "https://")):
            images.append(fetch_image_url(url, param=where))
        else:
            images.append(decode_base64_image(url, param=where))
    return ChatRequest(
        messages=converted,
        prompt=last_user_text(converted),
        all_text="\n".join(text_of(m) for m in converted),
        images=images,
    )


# --- the conversation of a prompt-and-images request, or of one carrying messages -----------------
def _upload_bytes(value, param: str) -> bytes:
    """One image field's bytes: a file part (multipart), or base64 / a data URI (JSON or form text)."""
    if hasattr(value, "read"):
        if value.size > settings.MAX_IMAGE_BYTES:  # refuse before reading it into memory
            limit = settings.MAX_IMAGE_BYTES / (1024 * 1024)
            named = "The image" if param == "image" else f"The image at '{param}'"
            raise ApiError(
                "image_too_large",
                f"{named} is {value.size / (1024 * 1024):.1f} MB; the limit is {limit:g} MB.",
                param=param,
            )
        return value.read()
    if isinstance(value, str) and value:
        return decode_base64_image(value, param=param)
    raise ApiError("invalid_image", f"'{param}' must be a file upload, base64 or a data URI.", param=param)


def images_from(data) -> list[bytes]:
    """The images of a request, in order: repeated ``image`` file parts (multipart), or JSON's
    ``image`` as one string or a list of them (base64 or data URIs). None, "" or [] is no image:
    the model answers text-only questions too. Counted before any is read or decoded."""
    if isinstance(data, QueryDict):
        values = [value for value in data.getlist("image") if value != ""]
    else:
        value = data.get("image")
        values = value if isinstance(value, list) else [] if value in (None, "") else [value]
    validation.check_image_count(len(values), field="image")
    if len(values) == 1 and not isinstance(data.get("image"), list):
        return [_upload_bytes(values[0], "image")]
    return [_upload_bytes(value, f"image[{k}]") for k, value in enumerate(values)]


def conversation_from(data) -> dict:
    """``services.submit``'s conversation arguments from a request body (JSON or a form) or a
    websocket frame: ``messages`` (OpenAI's chat form), or ``prompt`` with 0..N ``image``s; never both."""
    if data.get("messages") is None:
        return {"prompt": data.get("prompt"), "images": images_from(data)}
    if isinstance(data, QueryDict):
        raise ApiError(
            "invalid_request",
            "'messages' is taken in JSON bodies (application/json), not in forms.",
            param="messages",
        )
    for other in ("prompt", "image"):
        if data.get(other) not in (None, "", []):
            raise ApiError(
                "invalid_request",
                "Send either 'messages' (a conversation, its images inside) or 'prompt' and 'image'; not both.",
                param=other,
            )
    parsed = parse_messages(data.get("messages"))
    return {"messages": parsed.messages, "images": parsed.images}


# --- every request field's treatment ------------------------------------------------------------
# DESIGN.md: every OpenAI parameter is honoured, informational (stored) or refused with
# unsupported_parameter, never ignored: a tool that sends `stop` or `tools` and gets a 200 would
# believe they worked. This table is the one place that says which; the README's "Parameters"
# table is checked against it (tests/test_openai_params.py).
HONOURED, STORED, REFUSED = "honoured", "stored", "refused"


@dataclass(frozen=True)
class Parameter:
    treatment: str
    note: str = ""  # honoured/stored: what it does; refused: what to do instead
    # Values of a refused field that change nothing, accepted: OpenAI's SDKs, litellm and LangChain
    # send such defaults (`stop: null`, `presence_penalty: 0`, `tools: []`) on every request, and
    # refusing them would break those clients for a parameter their user never set. null is always one.
    off: tuple = ()


def _refused(note: str, *off) -> Parameter:
    return Parameter(REFUSED, note, off)


_LATER = "is not supported yet"
CHAT_PARAMETERS: dict[str, Parameter] = {
    "model": Parameter(
        HONOURED,
        "a model of GET /v1/models (default: the server's `INFERENCE_MODEL_NAME`, or the tenant's first allowed "
        'model; see "Several models")',
    ),
    "messages": Parameter(
        HONOURED,
        "system/developer/user/assistant (tool_calls, reasoning_content)/tool messages; text and "
        "0..MAX_IMAGES_PER_REQUEST image_url parts in user messages, in any order",
    ),
    "max_tokens": Parameter(HONOURED, "1..MAX_NEW_TOKENS"),
    "max_completion_tokens": Parameter(HONOURED, "as max_tokens (wins over it)"),
    "temperature": Parameter(HONOURED, "0..2; below 1e-5 is greedy; omitted: the model's generation_config"),
    "top_p": Parameter(HONOURED, "0..1; omitted: the model's generation_config"),
    "top_k": Parameter(HONOURED, "vLLM's: -1 or 0 is off; omitted: the model's generation_config"),
    "min_p": Parameter(HONOURED, "vLLM's: 0..1"),
    "repetition_penalty": Parameter(HONOURED, "vLLM's: 0.01..2 (1 is off); omitted: the model's generation_config"),
    "presence_penalty": Parameter(HONOURED, "-2..2, OpenAI's definition"),
    "frequency_penalty": Parameter(HONOURED, "-2..2, OpenAI's definition"),
    "logit_bias": Parameter(HONOURED, "token id -> -100..100 added to its logit"),
    "seed": Parameter(HONOURED, "same seed and request, same answer (choice i uses seed + i)"),
    "stop": Parameter(HONOURED, "a string or up to 4; the stop text is not returned; finish_reason stop"),
    "n": Parameter(HONOURED, "1..MAX_N (default 4) choices decoded together"),
    "logprobs": Parameter(HONOURED, "per-token logprobs, OpenAI's shape"),
    "top_logprobs": Parameter(HONOURED, "0..20, with logprobs"),
    "response_format": Parameter(HONOURED, "text, json_object, json_schema (strict or not): enforced by llguidance"),
    "tools": Parameter(HONOURED, "function tools, rendered by the model's chat template; calls parsed"),
    "tool_choice": Parameter(HONOURED, "none, auto, required, or a named function (required/named enforced)"),
    "parallel_tool_calls": Parameter(HONOURED, "false: at most one tool call is returned"),
    "chat_template_kwargs": Parameter(HONOURED, "enable_thinking only: GLM's thinking on or off"),
    "reasoning_effort": Parameter(HONOURED, "none/minimal: no thinking; low/medium/high: thinking (GLM has no levels)"),
    "stream": Parameter(HONOURED, "SSE chat.completion.chunk events"),
    "stream_options": Parameter(HONOURED, "include_usage only"),
    "user": Parameter(STORED, "a string, kept in the query's params (first 200 characters)"),
    # OpenAI's successor of `user`, and a caching hint that changes no answer: kept like `user`.
    "safety_identifier": Parameter(STORED, "a string, kept in the query's params (first 200 characters)"),
    "prompt_cache_key": Parameter(STORED, "a string, kept in the query's params (first 200 characters)"),
    "metadata": Parameter(STORED, "up to 16 string pairs, kept in the query's params"),
    "store": Parameter(STORED, "a boolean, kept in the query's params (every query is logged anyway)"),
    "service_tier": Parameter(STORED, "auto, default, flex, scale or priority; kept in the query's params"),
    "functions": _refused("is OpenAI's deprecated form; send 'tools'", []),
    "function_call": _refused("is OpenAI's deprecated form; send 'tool_choice'", "none"),
    "prediction": _refused(_LATER),
    "audio": _refused("is not supported: answers are text only"),
    "modalities": _refused("is not supported: answers are text only", ["text"]),
    "web_search_options": _refused("is not supported: the model does not search the web"),
    "verbosity": _refused(_LATER),
    # vLLM's extras
    "best_of": _refused(_LATER, 1),
    "use_beam_search": _refused(_LATER, False),
    "length_penalty": _refused(_LATER, 1),
    "min_tokens": _refused(_LATER, 0),
    "ignore_eos": _refused(_LATER, False),
    "stop_token_ids": _refused(_LATER, []),
    "include_stop_str_in_output": _refused(_LATER, False),
    "skip_special_tokens": _refused(_LATER, True),
    "spaces_between_special_tokens": _refused(_LATER, True),
    "truncate_prompt_tokens": _refused(_LATER),
    "prompt_logprobs": _refused(_LATER),
    "echo": _refused(_LATER, False),
    "add_generation_prompt": _refused(_LATER, True),
    "continue_final_message": _refused(_LATER, False),
    "add_special_tokens": _refused(_LATER, False),
    "documents": _refused(_LATER),
    "chat_template": _refused("is not supported: the model's own chat template is always used"),
    "mm_processor_kwargs": _refused(_LATER),
    "guided_json": _refused(_LATER),
    "guided_regex": _refused(_LATER),
    "guided_choice": _refused(_LATER),
    "guided_grammar": _refused(_LATER),
    "guided_decoding_backend": _refused(_LATER),
    "structured_outputs": _refused(_LATER),
    "allowed_token_ids": _refused(_LATER),
    "bad_words": _refused(_LATER, []),
    "logits_processors": _refused(_LATER),
    "priority": _refused(_LATER, 0),
    "request_id": _refused(_LATER),
    "return_tokens_as_token_ids": _refused(_LATER, False),
}

SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")


def _same(value, off) -> bool:
    # False == 0 in Python; `logprobs: 0` or `presence_penalty: false` is not an "off" value.
    return isinstance(value, bool) == isinstance(off, bool) and type(value) in (type(off), int, float) and value == off


def refuse_unsupported(body: dict) -> None:
    """400 unsupported_parameter for the first field that is neither honoured nor stored (unless it
    carries a value that changes nothing), and for any field this table does not know."""
    for field, value in body.items():
        parameter = CHAT_PARAMETERS.get(field)
        if parameter is None:
            raise ApiError(
                "unsupported_parameter",
                f"'{field[:64]}' is not a parameter of /v1/chat/completions (is it misspelt?); "
                "the README's Parameters table lists them.",
                param=field[:64],
            )
        if parameter.treatment != REFUSED or value is None or any(_same(value, off) for off in parameter.off):
            continue
        raise ApiError(
            "unsupported_parameter", f"'{field}' {parameter.note}. Leave it out (or send null).", param=field
        )


def informational(body: dict) -> dict:
    """The stored fields of a request, checked (400 invalid_request naming the field), for ``params``."""
    stored = {}
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        text = validation.text(body.get(name), name)
        if text:
            stored[name] = text[:200]
    metadata = validation.obj(body.get("metadata"), "metadata")
    if metadata is not None:
        if len(metadata) > 16:
            raise validation.refuse("metadata", f"'metadata' has {len(metadata)} keys; the limit is 16.")
        for key, item in metadata.items():
            if len(key) > 64 or not isinstance(item, str) or len(item) > 512:
                raise validation.refuse(
                    "metadata",
                    "'metadata' holds up to 16 pairs of a key of at most 64 characters and a string value "
                    f"of at most 512; '{key[:64]}' is not one.",
                )
        stored["metadata"] = metadata
    store = body.get("store")
    if store is not None:
        stored["store"] = validation.boolean(store, "store")
    tier = validation.text(body.get("service_tier"), "service_tier")
    if tier is not None:
        if tier not in SERVICE_TIERS:
            raise validation.refuse("service_tier", f"'service_tier' must be one of {', '.join(SERVICE_TIERS)}.")
        stored["service_tier"] = tier
    return stored
