"""Liveness and readiness: the database, Redis, and a live worker with its model loaded per queue
(each registered model's)."""

from django.conf import settings
from django.db import connection

from config.errors import ApiError
from inference.dispatch import get_dispatcher


def database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            return cursor.fetchone() == (1,)
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False


def redis_ok() -> bool | None:
    """None in the embedded default (no Redis to reach)."""
    if not settings.REDIS_URL:
        return None
    from inference import workers

    try:
        return bool(workers.client().ping())
    except Exception:  # noqa: BLE001
        return False


def readiness(model: str | None = None) -> tuple[bool, dict]:
    """Ready: the database and Redis answer, and every served model (or only ``model``) has a live
    worker with it loaded on its queue (unless READY_REQUIRES_WORKER is off). The body lists each
    model's queue, whatever was asked."""
    status = get_dispatcher().status()
    database, redis_state = database_ok(), redis_ok()
    models = status["models"]
    if model is not None and model not in models:
        raise ApiError("model_not_found", f"No model '{model[:100]}' is served here.", param="model")
    queues = {}
    for name, served in models.items():
        queues[served["queue"]] = {
            # the embedded default names its model by what it loaded, as before there were several
            "model": status["model"] if status["mode"] == "embedded" else name,
            "model_loaded": served["model_loaded"],
            "workers": served["workers"],
        }
        if served.get("engines"):  # each worker's engine: in-process, or an engine server and its health
            queues[served["queue"]]["engines"] = served["engines"]
    wanted = models if model is None else {model: models[model]}
    loaded = all(served["model_loaded"] for served in wanted.values())
    ready = database and redis_state is not False and (loaded or not settings.READY_REQUIRES_WORKER)
    body = {
        "status": "ok" if ready else "unavailable",
        "database": database,
        "redis": redis_state,
        "model_loaded": loaded,
        "queues": queues,
    }
    return ready, body
