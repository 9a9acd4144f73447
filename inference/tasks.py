"""Celery: the task that runs a query, the worker's start-up (the model is loaded once, before any
work is taken), and the dispatcher the web tier uses when ``REDIS_URL`` is set.

Start a worker per GPU:  ``celery -A config worker -Q infer.glm-4.6v-flash``. With the in-process
engine (``INFERENCE_BACKEND=transformers``): a pool of INFERENCE_MAX_BATCH threads (settings), each
running one query, all feeding the one engine thread that decodes them in batches
(inference/engine/batching.py). With an engine server beside the worker (``INFERENCE_BACKEND=openai``):
ENGINE_MAX_INFLIGHT threads, each streaming one query from the server, which batches them.
"""

import base64
import json
import logging
import os
import sys
import threading
import time
import uuid
from datetime import timedelta

from celery import shared_task
from celery.signals import worker_init, worker_shutdown
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from config.celery import app  # noqa: F401 - the configured app, also in the web process
from inference import events, runner, workers
from inference.engine import backends

logger = logging.getLogger("sightline.tasks")


class _WorkerState:
    engine = None
    name = ""
    started = 0.0
    current_queries: set[str] = set()
    lock = threading.Lock()
    heartbeat: workers.HeartbeatThread | None = None
    pruner: workers.PrunerThread | None = None
    publisher: events.Publisher | None = None


state = _WorkerState()


def _heartbeat_info() -> dict:
    return {
        "name": state.name,
        "queue": settings.INFERENCE_QUEUE,
        "model": settings.INFERENCE_MODEL_NAME,
        "model_path": settings.INFERENCE_MODEL,
        "model_loaded": state.engine is not None and state.engine.loaded,
        "device": getattr(state.engine, "device", None),
        "engine": backends.engine_status(state.engine),
        "pid": os.getpid(),
        "started": state.started,
        "current_queries": sorted(state.current_queries),
        **workers.batch_info(state.engine),
    }


@worker_init.connect
def load_model_on_start(sender=None, **kwargs):
    """Open the engine once, before the worker takes any work: load the model (exit with a clear
    message if it can't be), or, with an engine server, wait for it (bounded, logged) to be ready."""
    from inference.engine import EngineError

    hostname = getattr(sender, "hostname", None) or f"worker@{os.uname().nodename}"
    state.name = f"{hostname}:{os.getpid()}"
    state.started = time.time()
    config = backends.from_settings()
    try:
        state.engine = backends.open_engine(config)
    except EngineError as exc:
        print(f"sightline worker: cannot load the model, not taking work: {exc.message}", file=sys.stderr, flush=True)
        os._exit(3)
    state.publisher = events.Publisher()
    state.heartbeat = workers.HeartbeatThread(state.name, _heartbeat_info, publisher=state.publisher)
    state.heartbeat.start()
    state.pruner = workers.start_pruner()
    if config.backend == "openai":
        logger.info(
            "sightline worker %s: engine server %s (model %s), queue %s, %d queries in flight at most",
            state.name,
            state.engine.url,
            config.model,
            settings.INFERENCE_QUEUE,
            config.max_inflight,
        )
        if not state.engine.wait_ready(settings.ENGINE_START_TIMEOUT):
            logger.error(
                "sightline worker %s: the engine server at %s is still not ready after %g s (%s); taking work "
                "anyway: each query waits up to ENGINE_WAIT_SECONDS for it",
                state.name,
                state.engine.url,
                settings.ENGINE_START_TIMEOUT,
                state.engine.status()["error"],
            )
        return
    logger.info(
        "sightline worker %s: model %s loaded on %s, queue %s",
        state.name,
        settings.INFERENCE_MODEL,
        state.engine.device,
        settings.INFERENCE_QUEUE,
    )


@worker_shutdown.connect
def stop_heartbeat(**kwargs):
    if state.heartbeat is not None:
        state.heartbeat.stop()
    if state.pruner is not None:
        state.pruner.stop()


@shared_task(name="inference.run_query", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_query(query_id: str) -> str | None:
    """Run one query by id. Idempotent: a query already claimed or finished is not run again."""
    if state.engine is None:  # only in a process that skipped worker start-up
        raise RuntimeError("this process has no model loaded")
    with state.lock:  # in the heartbeat from now on: the sweeper leaves a held query alone
        state.current_queries.add(query_id)
    try:
        backends.wait_engine(state.engine)
        close_old_connections()
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


def _query_of_message(raw: bytes) -> str | None:
    """The query id of a stored ``inference.run_query`` message (kombu's payload, as a queue holds
    it, or ``[payload, exchange, routing key]`` as the unacknowledged hash does; the body a base64
    JSON ``[args, kwargs, embed]``), or None for any other."""
    try:
        payload = json.loads(raw)
        if isinstance(payload, list):
            payload = payload[0]
        if payload.get("headers", {}).get("task") != run_query.name:
            return None
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(uuid.UUID(str(args[0])))
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class CeleryDispatcher:
    """Production: queries go to the Redis queue of their model; GPU workers take them."""

    def __init__(self):
        self.queue = settings.INFERENCE_QUEUE
        self._lock = threading.Lock()

    def start(self) -> None:
        pass

    def submit(self, query_id) -> None:
        run_query.apply_async(args=[str(query_id)], queue=self.queue)

    def cancel(self, query_id) -> None:
        workers.request_cancel(query_id)

    def recover_orphans(
        self, *, unclaimed_after: float, undispatched_after: float, held_by_live=frozenset(), limit: int = 1000
    ) -> dict:
        """Queue again the queued queries whose message no live worker will run.

        * Taken but never started: a worker holds a batch's worth of messages (INFERENCE_MAX_BATCH
          threads, acks late) and a live one claims each at once (``queued -> running``). A
          SIGKILLed worker's unclaimed ones would wait for the broker's visibility timeout (the
          hard time limit + 60 s, since a running query must not be handed out twice). A message
          unacknowledged for ``unclaimed_after`` seconds whose query is still queued, and that no
          live worker's heartbeat lists (``held_by_live``: a worker waiting for its engine server
          holds queued queries), goes back to the queue now.
        * Never dispatched: a web process that died between committing a row and sending its
          message leaves a queued row with no message at all. A row queued for
          ``undispatched_after`` seconds whose message is neither in the queue nor held by a
          worker is dispatched again.

        Were a message's holder alive after all, both deliveries race for the claim and one runs
        the query: the claim makes a second delivery harmless."""
        from inference.models import Query

        counts = {"redelivered": 0, "dispatched_again": 0}
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            if not hasattr(channel, "unacked_index_key"):  # not Redis (the tests' memory:// broker)
                return counts
            redis_client = channel.client
            held: dict[str, bytes] = {}  # query id -> delivery tag, of every message a worker holds
            for tag, raw in redis_client.hscan_iter(channel.unacked_key):
                query_id = _query_of_message(raw)
                if query_id:
                    held[query_id] = tag
            old_tags = set(
                redis_client.zrange(
                    channel.unacked_index_key, 0, time.time() - unclaimed_after, byscore=True, offset=0, num=limit
                )
            )
            stale_held = [q for q, tag in held.items() if tag in old_tags and q not in held_by_live]
            for query_id in Query.objects.filter(pk__in=stale_held, status=Query.Status.QUEUED).values_list(
                "pk", flat=True
            )[:limit]:
                channel.qos.restore_by_tag(held[str(query_id)], client=redis_client)
                counts["redelivered"] += 1

            cutoff = timezone.now() - timedelta(seconds=undispatched_after)
            old_queued = [
                str(query_id)
                for query_id in Query.objects.filter(
                    status=Query.Status.QUEUED, model=settings.INFERENCE_MODEL_NAME, created_at__lt=cutoff
                )
                .order_by("created_at")
                .values_list("pk", flat=True)[:limit]
            ]
            if not old_queued:
                return counts
            waiting = {_query_of_message(raw) for raw in redis_client.lrange(self.queue, 0, -1)}
            for query_id in old_queued:
                if query_id not in waiting and query_id not in held and query_id not in held_by_live:
                    self.submit(query_id)
                    counts["dispatched_again"] += 1
        return counts

    def unavailable(self) -> str | None:
        """Why no query can run now (no live worker on this queue has the model loaded), or None."""
        if self.status()["model_loaded"]:
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
            "engines": [{"worker": w.get("name", "?"), **(w.get("engine") or {})} for w in live],
            "queue": self.queue,
            "batching": [
                {
                    "worker": w.get("name", "?"),
                    **{k: w.get(k, 0) for k in ("batch_rows", "max_batch_rows", "tokens_per_second")},
                }
                for w in live
            ],
        }
