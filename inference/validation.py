"""Field checkers shared by every endpoint: REST (JSON and multipart), the OpenAI API and the
websocket consumer. Each refuses with ``400 invalid_request`` naming the field, so that bad input
never reaches the database or the engine (where it would be a 500: PostgreSQL refuses NUL bytes,
UTF-8 cannot encode a lone surrogate, ``int(1e999)`` overflows).

Conversation size (characters and prompt tokens of all messages together) is bounded here too,
before admission spends anything. Tokens are counted with the model's own ``tokenizer.json``
(the ``tokenizers`` package: no torch) when the web tier can find one locally, else bounded from
characters.
"""

import functools
import math
from pathlib import Path

from django.conf import settings

from config.errors import ApiError

# Temperatures below this are greedy: sampling with them divides logits by ~0 (NaN probabilities).
GREEDY_BELOW = 1e-5
# The chat template's tokens around each message (GLM: a role token and a newline).
MESSAGE_TOKEN_BOUND = 4


def refuse(field: str, message: str) -> ApiError:
    return ApiError("invalid_request", message, param=field)


# --- text -------------------------------------------------------------------------------------
def clean_text(value: str, field: str) -> str:
    """``value`` if it holds no NUL byte and no lone surrogate (neither can be stored)."""
    if "\x00" in value:
        raise refuse(field, f"'{field}' contains a NUL character (\\u0000); remove it.")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise refuse(
                field, f"'{field}' contains a lone UTF-16 surrogate (e.g. \\ud800) that is not valid Unicode text."
            ) from None
    return value


def text(value, field: str, *, required: bool = False, default: str | None = None) -> str | None:
    """An optional (or ``required``) JSON string, clean."""
    if value is None:
        if required:
            raise refuse(field, f"'{field}' is required.")
        return default
    if not isinstance(value, str):
        raise refuse(field, f"'{field}' must be a string; got {_kind(value)}.")
    return clean_text(value, field)


# --- numbers, booleans, objects -----------------------------------------------------------------
def _kind(value) -> str:
    return {bool: "a boolean", str: "a string", list: "an array", dict: "an object", type(None): "null"}.get(
        type(value), "a number"
    )


def _shown(value) -> str:
    return str(value) if abs(value) < 1e15 else "a number out of range"


def number(value, field: str, kind: type, low, high, default):
    """A JSON number (not a string, not a boolean), finite, of ``kind`` (int or float), in low..high."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise refuse(field, f"'{field}' must be a number; got {_kind(value)}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise refuse(field, f"'{field}' must be a finite number.")
    if kind is int and isinstance(value, float):  # 256.0 too, as OpenAI's API and the schema's integer say
        raise refuse(field, f"'{field}' must be a whole number (an integer, like 256); got {_shown(value)}.")
    if not low <= value <= high:  # compared before converting: float(10**400) would overflow
        raise refuse(field, f"'{field}' must be between {low} and {high}; got {_shown(value)}.")
    return kind(value)


def form_number(value, field: str):
    """A number sent as form text (multipart), as a JSON number for ``number``; None when absent."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise refuse(field, f"'{field}' must be a number.")
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)  # "1e999" gives inf, refused by ``number``
    except ValueError:
        raise refuse(field, f"'{field}' must be a number; got {value[:40]!r}.") from None


def boolean(value, field: str, *, default: bool = False) -> bool:
    """A JSON boolean: the string "false" is not one (it would read as true)."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise refuse(field, f"'{field}' must be true or false (a JSON boolean); got {_kind(value)}.")
    return value


def obj(value, field: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise refuse(field, f"'{field}' must be an object; got {_kind(value)}.")
    return value


def temperature(value) -> float:
    """0..2; below GREEDY_BELOW it is greedy (0)."""
    checked = number(value, "temperature", float, 0.0, 2.0, 0.0)
    return 0.0 if checked < GREEDY_BELOW else checked


# --- unknown fields -----------------------------------------------------------------------------
def refuse_unknown(data, known: tuple[str, ...], *, endpoint: str) -> None:
    """400 unsupported_parameter for a field ``endpoint`` does not take (JSON keys or form parts): a
    misspelt ``max_token`` must not pass silently with the default in its place (DESIGN.md)."""
    for field in data:
        if field not in known:
            raise ApiError(
                "unsupported_parameter",
                f"'{field[:64]}' is not a parameter of {endpoint} (is it misspelt?); it takes {', '.join(known)}.",
                param=field[:64],
            )


# --- whole JSON documents -----------------------------------------------------------------------
def check_json(document, *, where: str = "body") -> dict:
    """A parsed JSON request body or websocket frame: an object whose every string is clean text and
    every number finite. Iterative, so that a deep document cannot exhaust the stack here."""
    if not isinstance(document, dict):
        raise refuse(where, f"The {where} must be a JSON object ({{...}}); got {_kind(document)}.")
    stack = [(document, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                try:
                    clean_text(key, path or where)
                except ApiError as error:
                    error.message = f"A key in {error.message}"  # "A key in 'messages[0]' contains..."
                    raise
                stack.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, str):
            clean_text(value, path or where)
        elif isinstance(value, float) and not math.isfinite(value):
            raise refuse(path or where, f"'{path or where}' must be a finite number.")
    return document


# --- conversation size --------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    """The model's fast tokenizer from a local ``tokenizer.json`` (its folder, or the Hugging Face
    cache; never a download), or None."""
    path = Path(model) / "tokenizer.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "tokenizer.json")
        except Exception:  # noqa: BLE001 - not a repo id, no cache: bound from characters
            cached = None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - an unreadable file: bound from characters
        return None


def prompt_tokens(texts: list[str], *, images: int, model: str | None = None) -> int:
    """The conversation's prompt tokens: its texts counted with the model's tokenizer (``model``: a
    hub id or path, by default INFERENCE_MODEL; else one token per character, an upper bound), plus
    a bound per image, per message and for the template."""
    tokenizer = _tokenizer(model or settings.INFERENCE_MODEL)
    if tokenizer is None:
        counted = sum(len(t) for t in texts)
    else:
        counted = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)) if texts else 0
    return (
        counted + images * settings.IMAGE_TOKEN_BOUND + len(texts) * MESSAGE_TOKEN_BOUND + settings.TEMPLATE_TOKEN_BOUND
    )


def check_image_count(images: int, *, field: str, served=None) -> None:
    """At most MAX_IMAGES_PER_REQUEST images in one request (none is fine: text-only), and at most
    the ``max_images`` of the model asked for (``served``, its registry entry), when given."""
    limit = settings.MAX_IMAGES_PER_REQUEST
    where = "per request (MAX_IMAGES_PER_REQUEST)"
    if served is not None and served.max_images < limit:
        limit, where = served.max_images, f"for the model '{served.name}'"
    if images > limit:
        raise refuse(
            field,
            f"'{field}' has {images} images; the limit is {limit} {where}. Send fewer images, or several requests.",
        )


def check_conversation_size(texts: list[str], *, images: int, field: str, served=None) -> None:
    """All of a conversation's text together within MAX_PROMPT_CHARS and MAX_PROMPT_TOKENS (counted
    with the tokenizer of ``served``, the registry entry of the model asked for, when given), and
    its images within MAX_IMAGES_PER_REQUEST and the model's max_images. ``texts``: what the
    template renders of each message."""
    chars = sum(len(t) for t in texts)
    if chars > settings.MAX_PROMPT_CHARS:
        raise refuse(
            field,
            f"'{field}' is {chars:,} characters (all messages together); the limit is {settings.MAX_PROMPT_CHARS:,}.",
        )
    check_image_count(images, field=field, served=served)
    tokens = prompt_tokens(texts, images=images, model=served.model if served is not None else None)
    if tokens > settings.MAX_PROMPT_TOKENS:
        raise refuse(
            field,
            f"'{field}' comes to about {tokens:,} prompt tokens (images and chat template included); "
            f"the limit is {settings.MAX_PROMPT_TOKENS:,}. Shorten the conversation.",
        )
