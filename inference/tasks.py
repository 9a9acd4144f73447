"""Celery: the task that runs a query, the worker's start-up (the model is loaded once, before any
work is taken), and the dispatcher the web tier uses when ``REDIS_URL`` is set.

Start a worker per GPU:  ``celery -A config worker -Q infer.glm-4.6v-flash``: a pool of
INFERENCE_MAX_BATCH threads (settings), each running one query, all feeding the one engine thread
that decodes them in batches (inference/engine/batching.py).
"""

import logging
import os
import sys
import threading
import time

from celery import shared_task
from celery.signals import worker_init, worker_shutdown
from django.conf import settings
from django.db import close_old_connections

from config.celery import app  # noqa: F401 - the configured app, also in the web process
from inference import events, runner, workers

logger = logging.getLogger("sightline.tasks")


class _WorkerState:
    engine = None
    name = ""
    started = 0.0
    current_queries: set[str] = set()
    lock = threading.Lock()
    heartbeat: workers.HeartbeatThread | None = None
    publisher: events.Publisher | None = None


state = _WorkerState()


def _heartbeat_info() -> dict:
    return {
        "name": state.name,
        "queue": settings.INFERENCE_QUEUE,
        "model": settings.INFERENCE_MODEL_NAME,
        "model_path": settings.INFERENCE_MODEL,
        "model_loaded": state.engine is not None,
        "device": getattr(state.engine, "device", None),
        "pid": os.getpid(),
        "started": state.started,
        "current_queries": sorted(state.current_queries),
        **workers.batch_info(state.engine),
    }


@worker_init.connect
def load_model_on_start(sender=None, **kwargs):
    """Load the model once, before the worker takes any work; exit with a clear message if it can't."""
    from inference.engine import Engine, EngineError

    hostname = getattr(sender, "hostname", None) or f"worker@{os.uname().nodename}"
    state.name = f"{hostname}:{os.getpid()}"
    state.started = time.time()
    try:
        state.engine = Engine.load(settings.INFERENCE_MODEL, settings.INFERENCE_DEVICE, settings.INFERENCE_DTYPE)
    except EngineError as exc:
        print(f"sightline worker: cannot load the model, not taking work: {exc.message}", file=sys.stderr, flush=True)
        os._exit(3)
    logger.info(
        "sightline worker %s: model %s loaded on %s, queue %s",
        state.name,
        settings.INFERENCE_MODEL,
        state.engine.device,
        settings.INFERENCE_QUEUE,
    )
    state.engine.enable_batching(
        max_batch=settings.INFERENCE_MAX_BATCH,
        wait_ms=settings.INFERENCE_BATCH_WAIT_MS,
        max_tokens=settings.INFERENCE_MAX_BATCH_TOKENS,
        pending=lambda: len(state.current_queries),  # the tasks this worker runs now
    )
    state.publisher = events.Publisher()
    state.heartbeat = workers.HeartbeatThread(state.name, _heartbeat_info, publisher=state.publisher)
    state.heartbeat.start()


@worker_shutdown.connect
def stop_heartbeat(**kwargs):
    if state.heartbeat is not None:
        state.heartbeat.stop()


@shared_task(name="inference.run_query", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_query(query_id: str) -> str | None:
    """Run one query by id. Idempotent: a query already claimed or finished is not run again."""
    if state.engine is None:  # only in a process that skipped worker start-up
        raise RuntimeError("this process has no model loaded")
    close_old_connections()
    with state.lock:
        state.current_queries.add(query_id)
    try:
        return runner.execute(
            query_id,
            state.engine,
            state.publisher,
            state.name,
            should_stop=workers.cancel_checker(query_id),
        )
    finally:
        with state.lock:
            state.current_queries.discard(query_id)
        close_old_connections()


class CeleryDispatcher:
    """Production: queries go to the Redis queue of their model; GPU workers take them."""

    # How long a "some worker has the model" answer is believed without asking Redis again. Finding
    # the heartbeats scans Redis's keyspace (SCAN, ~65 ms at 100,000 keys), too much for every
    # request; a worker that dies already looks alive for up to WORKER_HEARTBEAT_TTL, so believing
    # its heartbeat 1 s longer changes nothing that matters. "No worker" is never remembered: it
    # is asked again on every request, so the first worker to come is seen at once.
    AVAILABLE_FOR_SECONDS = 1.0

    def __init__(self):
        self.queue = settings.INFERENCE_QUEUE
        self._lock = threading.Lock()
        self._available_until = 0.0

    def start(self) -> None:
        pass

    def submit(self, query_id) -> None:
        run_query.apply_async(args=[str(query_id)], queue=self.queue)

    def cancel(self, query_id) -> None:
        workers.request_cancel(query_id)

    def unavailable(self) -> str | None:
        """Why no query can run now (no live worker on this queue has the model loaded), or None."""
        if time.monotonic() < self._available_until:
            return None
        if self.status()["model_loaded"]:
            self._available_until = time.monotonic() + self.AVAILABLE_FOR_SECONDS
            return None
        return (
            f"No worker has the model '{settings.INFERENCE_MODEL_NAME}' loaded on queue {self.queue}; "
            "GET /health/ready answers 200 once one has. Retry then, or submit an async job (POST /v1/queries)."
        )

    def status(self) -> dict:
        try:
            live = [w for w in workers.live_workers() if w.get("queue") == self.queue]
        except Exception:  # noqa: BLE001 - Redis down: no worker can be seen
            live = []
        return {
            "mode": "celery",
            "model": settings.INFERENCE_MODEL_NAME,
            "model_loaded": any(w.get("model_loaded") for w in live),
            "workers": len(live),
            "queue": self.queue,
            "batching": [
                {
                    "worker": w.get("name", "?"),
                    **{k: w.get(k, 0) for k in ("batch_rows", "max_batch_rows", "tokens_per_second")},
                }
                for w in live
            ],
        }
