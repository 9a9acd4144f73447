"""Liveness and readiness: the database, Redis, and a live worker with its model loaded per queue."""

from django.conf import settings
from django.db import connection

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


def readiness() -> tuple[bool, dict]:
    status = get_dispatcher().status()
    database, redis_state = database_ok(), redis_ok()
    queue = status.get("queue", "embedded")
    queues = {
        queue: {"model": status["model"], "model_loaded": status["model_loaded"], "workers": status.get("workers", 1)}
    }
    ready = database and redis_state is not False and (status["model_loaded"] or not settings.READY_REQUIRES_WORKER)
    body = {
        "status": "ok" if ready else "unavailable",
        "database": database,
        "redis": redis_state,
        "model_loaded": status["model_loaded"],
        "queues": queues,
    }
    if status.get("engines"):  # each worker's engine: in-process, or an engine server and its health
        queues[queue]["engines"] = status["engines"]
    return ready, body
