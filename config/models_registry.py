"""The registry of served models: the one place that reads ``INFERENCE_MODELS`` and answers which
models exist, their queues, engines and limits.

``INFERENCE_MODELS`` (JSON) maps each public name — what clients send as ``model`` and see in
``/v1/models`` — to its entry::

    {"glm-4.6v-flash": {"model": "zai-org/GLM-4.6V-Flash"},
     "glm-4.6v-flash-vllm": {"backend": "openai", "model": "zai-org/GLM-4.6V-Flash",
                             "engine_url": "http://127.0.0.1:8001", "queue": "infer.vllm", "max_images": 4}}

Fields: ``model`` (required: a hub id or a path; with ``openai``, the id the engine server serves
unless ``engine_model`` says otherwise; the web tier counts prompt tokens with its tokenizer),
``queue`` (default ``infer.<name>``), ``backend`` (``transformers``, the default, or ``openai``),
``engine_url`` (required with ``openai``, only with it), ``engine_api_key``, ``engine_model``,
``max_images`` (0..MAX_IMAGES_PER_REQUEST) and ``max_new_tokens`` (1..MAX_NEW_TOKENS). Anything else
— an unknown field, a wrong type, two models on one queue — stops the process at start, naming it.

Unset, the registry is the one model today's settings describe (``INFERENCE_MODEL_NAME`` on
``INFERENCE_QUEUE``, ``INFERENCE_BACKEND``, ``INFERENCE_MODEL``...), read when asked, so the
embedded default and everything built on those settings is unchanged.

Each process has one model of its own, ``INFERENCE_MODEL_NAME`` (with a registry: the first entry
unless set): a worker serves it (its queue, its engine), and a request without ``model`` asks for it.

This module imports nothing of Django's apps (settings.py parses with it), nor torch.
"""

import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

from django.core.exceptions import ImproperlyConfigured

BACKENDS = ("transformers", "openai")
# A public name or a queue: what a URL path, a Redis key and Query.model (200 characters) can hold.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")
FIELDS = (
    "model",
    "queue",
    "backend",
    "engine_url",
    "engine_api_key",
    "engine_model",
    "max_images",
    "max_new_tokens",
)
# The single-model settings an entry replaces: set beside INFERENCE_MODELS, they would contradict it.
REPLACED_SETTINGS = (
    "INFERENCE_MODEL",
    "INFERENCE_QUEUE",
    "INFERENCE_BACKEND",
    "INFERENCE_ENGINE_URL",
    "INFERENCE_ENGINE_API_KEY",
    "INFERENCE_ENGINE_MODEL",
)


@dataclass(frozen=True)
class ServedModel:
    name: str  # the public name
    queue: str  # its Celery queue: its workers consume it, the web tier sends its queries there
    backend: str  # "transformers" | "openai"
    model: str  # a hub id or a path: what transformers loads, whose tokenizer the web tier counts with
    engine_url: str = ""  # openai: the engine server
    engine_api_key: str = field(default="", repr=False)
    engine_model: str = ""  # openai: the id the engine server serves ("" = model)
    max_images: int = 8
    max_new_tokens: int = 1024

    def as_dict(self) -> dict:
        """What /health/ready and logs may show: no API key."""
        return {
            "queue": self.queue,
            "backend": self.backend,
            "model": self.model,
            "engine_url": self.engine_url,
            "engine_model": self.engine_model,
            "max_images": self.max_images,
            "max_new_tokens": self.max_new_tokens,
        }


def _bad(message: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"INFERENCE_MODELS is not valid: {message}.")


def _text(entry: dict, name: str, field: str, default: str = "") -> str:
    value = entry.get(field, default)
    if not isinstance(value, str):
        raise _bad(f"'{name}'.{field} must be a string, not {type(value).__name__}")
    return value.strip()


def _whole(entry: dict, name: str, field: str, low: int, high: int, setting: str) -> int:
    value = entry.get(field, high)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"'{name}'.{field} must be a whole number from {low} to {high} ({setting}); got {value!r}")
    return value


def _url(value: str, name: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise _bad(
            f"'{name}'.engine_url must be an http:// or https:// URL such as http://127.0.0.1:8001; got {value!r}"
        )
    return value.rstrip("/")


def parse(raw: str, *, max_images: int, max_new_tokens: int) -> dict[str, ServedModel]:
    """The registry ``INFERENCE_MODELS`` describes, in its order; {} when unset. ``max_images`` and
    ``max_new_tokens``: the global limits, each entry's default and ceiling. Raises
    ``ImproperlyConfigured`` naming what is wrong."""
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise _bad(f"not JSON ({exc})") from None
    if not isinstance(document, dict) or not document:
        raise _bad(
            'want a JSON object of one or more models, e.g. {"glm-4.6v-flash": {"model": "zai-org/GLM-4.6V-Flash"}}'
        )
    models: dict[str, ServedModel] = {}
    queues: dict[str, str] = {}
    for name, entry in document.items():
        if not NAME.match(name):
            raise _bad(
                f"the model name {name[:60]!r} must be 1-200 letters, digits or ._:/@+-, a letter or digit first"
            )
        if not isinstance(entry, dict):
            raise _bad(f'\'{name}\' must be an object such as {{"model": "zai-org/GLM-4.6V-Flash"}}')
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            raise _bad(f"'{name}' has unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
        backend = _text(entry, name, "backend", "transformers").lower()
        if backend not in BACKENDS:
            raise _bad(f"'{name}'.backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        model = _text(entry, name, "model")
        if not model:
            raise _bad(
                f"'{name}' needs 'model': the hub id or path to load (transformers), or the id its engine server serves"
            )
        queue = _text(entry, name, "queue", f"infer.{name}")
        if not NAME.match(queue):
            raise _bad(f"'{name}'.queue {queue[:60]!r} must be 1-200 letters, digits or ._:/@+-")
        if queue in queues:
            raise _bad(f"'{name}' and '{queues[queue]}' share the queue {queue}: each model needs a queue of its own")
        queues[queue] = name
        engine_url = _text(entry, name, "engine_url")
        if backend == "openai" and not engine_url:
            raise _bad(
                f"'{name}' has backend openai and needs 'engine_url': its engine server, e.g. http://127.0.0.1:8001"
            )
        if backend != "openai" and (engine_url or "engine_api_key" in entry or "engine_model" in entry):
            raise _bad(f"'{name}': engine_url, engine_api_key and engine_model are for backend openai only")
        models[name] = ServedModel(
            name=name,
            queue=queue,
            backend=backend,
            model=model,
            engine_model=_text(entry, name, "engine_model"),
            engine_url=_url(engine_url, name) if engine_url else "",
            engine_api_key=_text(entry, name, "engine_api_key"),
            max_images=_whole(entry, name, "max_images", 0, max_images, "MAX_IMAGES_PER_REQUEST"),
            max_new_tokens=_whole(entry, name, "max_new_tokens", 1, max_new_tokens, "MAX_NEW_TOKENS"),
        )
    return models


# --- reading it (at run time, from the settings) --------------------------------------------------
def registry() -> dict[str, ServedModel]:
    """Every served model by public name, in the registry's order."""
    from django.conf import settings

    if settings.INFERENCE_MODELS:
        return settings.INFERENCE_MODELS
    # No registry: the one model of the single-model settings, read now (tests change them).
    only = ServedModel(
        name=settings.INFERENCE_MODEL_NAME,
        queue=settings.INFERENCE_QUEUE,
        backend=settings.INFERENCE_BACKEND,
        model=settings.INFERENCE_MODEL,
        engine_url=settings.INFERENCE_ENGINE_URL,
        engine_api_key=settings.INFERENCE_ENGINE_API_KEY,
        engine_model=settings.INFERENCE_ENGINE_MODEL,
        max_images=settings.MAX_IMAGES_PER_REQUEST,
        max_new_tokens=settings.MAX_NEW_TOKENS,
    )
    return {only.name: only}


def names() -> list[str]:
    return list(registry())


def get(name: str | None) -> ServedModel | None:
    return registry().get(name) if name else None


def own() -> ServedModel:
    """This process's model (INFERENCE_MODEL_NAME): the one a worker serves, the one a request
    without ``model`` asks for."""
    from django.conf import settings

    return registry()[settings.INFERENCE_MODEL_NAME]
