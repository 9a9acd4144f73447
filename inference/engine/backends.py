"""Which engine a worker drives, from a model's configuration.

``transformers``: the model loaded in the worker's own process (``core.Engine``, batched by our
scheduler). ``openai``: an OpenAI-compatible engine server beside the worker (vLLM, SGLang;
``remote.RemoteEngine``), which does the batching. The configuration is one ``ModelBackend`` per
served model, from its entry in the registry (config/models_registry.py: ``for_model``); a worker
opens the engine of its own model (``from_settings``), whose queue it consumes.

Importing this module imports neither torch nor transformers.
"""

from dataclasses import dataclass

BACKENDS = ("transformers", "openai")


@dataclass(frozen=True)
class ModelBackend:
    backend: str  # "transformers" | "openai"
    model: str  # a path or hub id (transformers); the id the engine server serves (openai)
    url: str = ""  # the engine server (openai)
    api_key: str = ""
    device: str = ""  # transformers: "" = CUDA when present
    dtype: str = ""
    max_inflight: int = 64  # openai: queries in flight at the server at once
    max_batch: int = 16  # transformers: queries decoded together

    @property
    def concurrency(self) -> int:
        """Queries a worker runs at once (its threads)."""
        return self.max_inflight if self.backend == "openai" else self.max_batch

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown engine backend '{self.backend}': use one of {', '.join(BACKENDS)}")
        if self.backend == "openai" and not self.url:
            raise ValueError("the openai backend needs the engine server's URL")


def for_model(served) -> ModelBackend:
    """The engine of a registered model (``config.models_registry.ServedModel``), with this
    worker's device, dtype and concurrency settings."""
    from django.conf import settings

    remote = served.backend == "openai"
    return ModelBackend(
        backend=served.backend,
        model=(served.engine_model or served.model) if remote else served.model,
        url=served.engine_url,
        api_key=served.engine_api_key,
        device=settings.INFERENCE_DEVICE,
        dtype=settings.INFERENCE_DTYPE,
        max_inflight=settings.ENGINE_MAX_INFLIGHT,
        max_batch=settings.INFERENCE_MAX_BATCH,
    )


def from_settings() -> ModelBackend:
    """This process's model (INFERENCE_MODEL_NAME in the registry: INFERENCE_MODELS, or the single-model
    settings INFERENCE_BACKEND, INFERENCE_MODEL, INFERENCE_ENGINE_*)."""
    from config import models_registry

    return for_model(models_registry.own())


def open_engine(config: ModelBackend, *, pending=None):
    """The engine of ``config``: the model loaded in this process (``ModelLoadError`` if it can't be),
    or a client of the engine server with its monitor started (it does not wait for the server:
    see ``RemoteEngine.wait_ready``)."""
    from django.conf import settings

    if config.backend == "openai":
        from inference.engine.remote import RemoteEngine

        return RemoteEngine(
            config.url,
            config.model,
            api_key=config.api_key,
            max_inflight=config.max_inflight,
            probe_seconds=settings.ENGINE_PROBE_SECONDS,
            time_limit=float(settings.INFERENCE_SOFT_TIME_LIMIT),
        ).start_monitor()
    from inference.engine.core import Engine

    engine = Engine.load(config.model, config.device, config.dtype)
    engine.enable_batching(
        max_batch=config.max_batch,
        wait_ms=settings.INFERENCE_BATCH_WAIT_MS,
        max_tokens=settings.INFERENCE_MAX_BATCH_TOKENS,
        pending=pending,
    )
    return engine


def wait_engine(engine) -> None:
    """A query taken while the worker's engine server is down waits for it (the query stays queued),
    at most ENGINE_WAIT_SECONDS; then it runs, and ends model_unavailable if the server is still away."""
    from django.conf import settings

    if engine.loaded or not hasattr(engine, "wait_ready"):
        return
    engine.poke()
    engine.wait_ready(settings.ENGINE_WAIT_SECONDS)


def engine_status(engine) -> dict:
    """What the heartbeat says of a worker's engine: its backend, and for an engine server its health."""
    if engine is None:
        return {"backend": None}
    status = getattr(engine, "status", None)
    if callable(status):
        return status()
    return {"backend": "transformers", "model": getattr(engine, "model_id", None), "ready": engine.loaded}
