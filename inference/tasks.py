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

from config import models_registry
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


def _wrong_queues(sender) -> str | None:
    """Why this worker's queues (``-Q``; none: CELERY_TASK_DEFAULT_QUEUE) do not fit its model, or
    None: it must consume its model's queue and no other model's, or it would run queries on the
    wrong model (or none would reach it)."""
    amqp = getattr(getattr(sender, "app", None), "amqp", None)
    if amqp is None:
        return None
    consumed = set(amqp.queues.consume_from or ())
    own = settings.INFERENCE_QUEUE
    if own not in consumed:
        return (
            f"it serves the model '{settings.INFERENCE_MODEL_NAME}', whose queue is {own}, but consumes "
            f"{', '.join(sorted(consumed)) or 'nothing'}: start it with -Q {own} (or without -Q)"
        )
    others = sorted(
        f"{served.queue} ({served.name})"
        for served in models_registry.registry().values()
        if served.queue in consumed and served.queue != own
    )
    if others:
        return (
            f"it serves the model '{settings.INFERENCE_MODEL_NAME}' (queue {own}) but also consumes "
            f"{', '.join(others)}: start one worker per model, each with INFERENCE_MODEL_NAME and -Q its queue"
        )
    return None


@worker_init.connect
def load_model_on_start(sender=None, **kwargs):
    """Open the engine once, before the worker takes any work: load the model (exit with a clear
    message if it can't be), or, with an engine server, wait for it (bounded, logged) to be ready."""
    from inference.engine import EngineError

    hostname = getattr(sender, "hostname", None) or f"worker@{os.uname().nodename}"
    state.name = f"{hostname}:{os.getpid()}"
    state.started = time.time()
    wrong = _wrong_queues(sender)
    if wrong:
        print(f"sightline worker: {wrong}; not taking work", file=sys.stderr, flush=True)
        os._exit(3)
    config = backends.from_settings()
    try:
        # pending: the tasks this worker holds now, so a query that comes alone does not wait out
        # the batch's gathering window.
        state.engine = backends.open_engine(config, pending=lambda: len(state.current_queries))
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
def run_query(query_id: str, stream: bool = True) -> str | None:
    """Run one query by id. Idempotent: a query already claimed or finished is not run again.
    ``stream`` off: nobody subscribed to its deltas (runner.execute); a message without it (the
    sweeper's, an older web process's) streams."""
    if state.engine is None:  # only in a process that skipped worker start-up
        raise RuntimeError("this process has no model loaded")
    with state.lock:  # in the heartbeat from now on: the sweeper leaves a held query alone
        state.current_queries.add(query_id)
    try:
        backends.wait_engine(state.engine)
        close_old_connections()
        outcome = runner.execute(
            query_id,
            state.engine,
            state.publisher,
            state.name,
            should_stop=workers.cancel_checker(query_id),
            model=settings.INFERENCE_MODEL_NAME,
            stream=stream,
        )
        if outcome is None:
            _send_on_if_misrouted(query_id)
        return outcome
    finally:
        with state.lock:
            state.current_queries.discard(query_id)
        close_old_connections()


def _send_on_if_misrouted(query_id: str) -> None:
    """A queued query of another model reached this worker (a message sent while the registry said
    otherwise): it was not run here; send it to its own model's queue (if that model is registered;
    else it waits, and ends after MAX_QUEUED_SECONDS)."""
    from inference.models import Query

    model = (
        Query.objects.filter(pk=query_id, status=Query.Status.QUEUED)
        .exclude(model=settings.INFERENCE_MODEL_NAME)
        .values_list("model", flat=True)
        .first()
    )
    if model is None:
        return
    try:
        queue = CeleryDispatcher.queue_of(model)
    except LookupError:
        logger.error("query %s is for the model '%s', which is not registered here; left queued", query_id, model)
        return
    logger.warning("query %s is for the model '%s', not this worker's: sent on to %s", query_id, model, queue)
    run_query.apply_async(args=[str(query_id)], queue=queue)


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
    """Production: queries go to the Redis queue of their model (the registry's,
    config/models_registry.py); each model's GPU workers take them."""

    # How long a "some worker has the model" answer is believed without asking Redis again. Finding
    # the heartbeats scans Redis's keyspace (SCAN, ~65 ms at 100,000 keys), too much for every
    # request; a worker that dies already looks alive for up to WORKER_HEARTBEAT_TTL, so believing
    # its heartbeat 1 s longer changes nothing that matters. "No worker" is never remembered: it
    # is asked again on every request, so the first worker to come is seen at once.
    AVAILABLE_FOR_SECONDS = 1.0

    def __init__(self):
        self._lock = threading.Lock()
        self._available_until: dict[str, float] = {}

    @property
    def queue(self) -> str:
        """This process's own model's queue."""
        return settings.INFERENCE_QUEUE

    def start(self) -> None:
        pass

    @staticmethod
    def queue_of(model: str | None) -> str:
        """The queue of a registered model (None: this process's own); ``LookupError`` for another."""
        served = models_registry.own() if model is None else models_registry.get(model)
        if served is None:
            raise LookupError(f"the model '{model}' is not in the registry (INFERENCE_MODELS)")
        return served.queue

    def submit(self, query_id, model: str | None = None, *, stream: bool = True) -> None:
        kwargs = {} if stream else {"stream": False}
        run_query.apply_async(args=[str(query_id)], kwargs=kwargs, queue=self.queue_of(model))

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
            # Only the messages held longer than unclaimed_after are read (most sweeps find none).
            stale_held: dict[str, bytes] = {}  # query id -> delivery tag
            old_tags = redis_client.zrange(
                channel.unacked_index_key, 0, time.time() - unclaimed_after, byscore=True, offset=0, num=limit
            )
            for tag in old_tags:
                raw = redis_client.hget(channel.unacked_key, tag)
                query_id = _query_of_message(raw) if raw else None
                if query_id and query_id not in held_by_live:
                    stale_held[query_id] = tag
            for query_id in Query.objects.filter(pk__in=list(stale_held), status=Query.Status.QUEUED).values_list(
                "pk", flat=True
            ):
                channel.qos.restore_by_tag(stale_held[str(query_id)], client=redis_client)
                counts["redelivered"] += 1

            # Every registered model's rows, each sent to its model's queue (one sweeper serves them all).
            queues = {served.name: served.queue for served in models_registry.registry().values()}
            cutoff = timezone.now() - timedelta(seconds=undispatched_after)
            old_queued = [
                (str(query_id), model)
                for query_id, model in Query.objects.filter(
                    status=Query.Status.QUEUED, model__in=list(queues), created_at__lt=cutoff
                )
                .order_by("created_at")
                .values_list("pk", "model")[:limit]
            ]
            if not old_queued:
                return counts
            # Every message a worker holds, and every one waiting in these models' queues.
            held = {_query_of_message(raw) for raw in redis_client.hvals(channel.unacked_key)}
            waiting = {
                _query_of_message(raw)
                for queue in {queues[model] for _, model in old_queued}
                for raw in redis_client.lrange(queue, 0, -1)
            }
            for query_id, model in old_queued:
                if query_id not in waiting and query_id not in held and query_id not in held_by_live:
                    self.submit(query_id, model)
                    counts["dispatched_again"] += 1
        return counts

    def unavailable(self, model: str | None = None) -> str | None:
        """Why no query of ``model`` (None: this process's own) can run now — no live worker on its
        queue has it loaded — or None. A model seen served is believed for AVAILABLE_FOR_SECONDS
        (reading the heartbeats costs a Redis scan); one seen unserved is never remembered."""
        name = model or settings.INFERENCE_MODEL_NAME
        if time.monotonic() < self._available_until.get(name, 0.0):
            return None
        served = self.status()["models"].get(name)
        if served is not None and served["model_loaded"]:
            self._available_until[name] = time.monotonic() + self.AVAILABLE_FOR_SECONDS
        if served is None or served["model_loaded"]:
            return None
        return (
            f"No worker has the model '{name}' loaded on queue {served['queue']}; "
            "GET /health/ready answers 200 once one has. Retry then, or submit an async job (POST /v1/queries)."
        )

    def status(self) -> dict:
        """Per registered model (``models``): its queue and the live workers on it, from their
        heartbeats; at the top, this process's own model's, as before there were several."""
        try:
            live = workers.live_workers()
        except Exception:  # noqa: BLE001 - Redis down: no worker can be seen
            live = []
        models = {}
        for served in models_registry.registry().values():
            mine = [w for w in live if w.get("queue") == served.queue]
            models[served.name] = {
                "queue": served.queue,
                "model_loaded": any(w.get("model_loaded") for w in mine),
                "workers": len(mine),
                "engines": [{"worker": w.get("name", "?"), **(w.get("engine") or {})} for w in mine],
                "batching": [
                    {
                        "worker": w.get("name", "?"),
                        **{k: w.get(k, 0) for k in ("batch_rows", "max_batch_rows", "tokens_per_second")},
                    }
                    for w in mine
                ],
            }
            if not models[served.name]["model_loaded"]:
                # Seen unserved: no longer believed served (unavailable() asks again next time).
                self._available_until.pop(served.name, None)
        return {
            "mode": "celery",
            "model": settings.INFERENCE_MODEL_NAME,
            **models[settings.INFERENCE_MODEL_NAME],
            "models": models,
        }
