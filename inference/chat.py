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
