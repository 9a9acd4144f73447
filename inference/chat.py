"""OpenAI-style chat requests: turning ``messages`` into what the engine and the query log take.

Sightline's model answers questions about an image, so a request carries exactly one image (an
``image_url`` part, as a data URI; remote URLs only from hosts in IMAGE_URL_ALLOWED_HOSTS) and
some text. System, user and assistant turns are kept and go through the model's chat template.
"""

from dataclasses import dataclass

from config.errors import ApiError
from inference import validation
from inference.images import decode_base64_image, fetch_image_url

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ChatRequest:
    messages: list  # chat-template messages, the image as a {"type": "image"} placeholder
    prompt: str  # the last user turn's text, for the query log
    all_text: str  # every message's text, to bound the prompt's tokens
    image_bytes: bytes


def _text_of(content, index: int) -> tuple[list, list[str]]:
    """(template parts, image URLs) of one message's content."""
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return [{"type": "text", "text": validation.clean_text(content, where)}], []
    if not isinstance(content, list):
        raise ApiError("invalid_request", f"{where} must be a string or a list of parts.", param=where)
    parts, images = [], []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": validation.text(part.get("text"), f"{where}.text", required=True)})
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str) or not url:
                raise ApiError(
                    "invalid_request", f"{where}.image_url.url is required (a string).", param=f"{where}.image_url"
                )
            parts.append({"type": "image"})
            images.append(validation.clean_text(url, f"{where}.image_url"))
        else:
            raise ApiError("invalid_request", f"{where} must be a 'text' or an 'image_url' part.", param=where)
    return parts, images


def parse_messages(messages) -> ChatRequest:
    """The checked conversation. All messages together are bounded (characters and prompt tokens)
    here, before admission: the limit is the conversation's, not its last message's."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("invalid_request", "'messages' must be a non-empty list.", param="messages")
    converted, urls, texts, prompt = [], [], [], None
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError("invalid_request", f"messages[{index}] must be an object.", param=f"messages[{index}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(
                "invalid_request",
                f"messages[{index}].role must be one of system, developer, user, assistant.",
                param=f"messages[{index}].role",
            )
        validation.text(message.get("name"), f"messages[{index}].name")
        role = ROLES[role]
        parts, images = _text_of(message.get("content"), index)
        if images and role != "user":
            raise ApiError("invalid_request", "Images may only be sent in user messages.", param=f"messages[{index}]")
        urls.extend(images)
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        texts.append(text)
        if role == "user":
            prompt = text
        converted.append({"role": role, "content": parts})
    if len(urls) != 1:
        raise ApiError(
            "invalid_request",
            f"Send exactly one image (an image_url part with a data URI); this request has {len(urls)}.",
            param="messages",
        )
    if prompt is None:
        raise ApiError("invalid_request", "At least one user message is required.", param="messages")
    validation.check_conversation_size(texts, images=len(urls), field="messages")
    url = urls[0]
    if url.lower().startswith(("http://", "https://")):
        image_bytes = fetch_image_url(url)
    else:
        image_bytes = decode_base64_image(url, param="image_url")
    return ChatRequest(messages=converted, prompt=prompt, all_text="\n".join(texts), image_bytes=image_bytes)


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
    "model": Parameter(HONOURED, "a model of GET /v1/models (default: the served model)"),
    "messages": Parameter(HONOURED, "system/developer/user/assistant (with tool_calls)/tool; text and image_url parts"),
    "max_tokens": Parameter(HONOURED, "1..MAX_NEW_TOKENS, per choice"),
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
