"""What workers share through Redis: heartbeats, cancel flags, and the sweeper of stuck queries.

* Each Celery worker writes ``<prefix>:worker:<name>`` every WORKER_HEARTBEAT_SECONDS with a TTL of
  WORKER_HEARTBEAT_TTL: its queue, model, whether the model is loaded, and the query it runs.
  ``/health/ready`` reads these.
* A client that cancels (or disconnects) sets ``<prefix>:cancel:<query id>``; the worker running
  that query checks it between tokens and stops.
* The sweeper fails ``running`` queries whose worker has no heartbeat any more (``worker_lost``)
  and ``queued`` queries no worker took within MAX_QUEUED_SECONDS. Every worker runs it from its
  heartbeat thread, one at a time across workers by a Redis lock; ``manage.py sweep_queries`` runs
  it by hand or from cron.
"""

import json
import logging
import threading
import time
from datetime import timedelta

import redis
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from config.redis import client
from config.redis import key as _key

logger = logging.getLogger("sightline.workers")


# --- heartbeats ---------------------------------------------------------------------------------
def beat(name: str, info: dict) -> None:
    client().set(_key("worker", name), json.dumps(info), px=int(settings.WORKER_HEARTBEAT_TTL * 1000))


def forget(name: str) -> None:
    client().delete(_key("worker", name))


def live_workers() -> list[dict]:
    """Workers whose heartbeat has not expired."""
    r = client()
    names = list(r.scan_iter(match=_key("worker", "*"), count=500))
    if not names:
        return []
    return [json.loads(value) for value in r.mget(names) if value is not None]


# --- cancel flags -------------------------------------------------------------------------------
def request_cancel(query_id) -> None:
    client().set(_key("cancel", str(query_id)), "1", ex=3600)


def cancel_requested(query_id) -> bool:
    return bool(client().exists(_key("cancel", str(query_id))))


def cancel_checker(query_id, every: float = 0.05):
    """A ``should_stop`` for the engine that asks Redis at most every ``every`` seconds."""
    state = {"at": 0.0, "stop": False}

    def should_stop() -> bool:
        now = time.monotonic()
        if not state["stop"] and now - state["at"] >= every:
            state["at"] = now
            try:
                state["stop"] = cancel_requested(query_id)
            except redis.RedisError:
                logger.warning("could not read the cancel flag of %s", query_id)
        return state["stop"]

    return should_stop


# --- the sweeper --------------------------------------------------------------------------------
def sweep(live_names: set[str] | None = None, publisher=None) -> dict:
    """Fail queries stuck on dead workers or never taken. Returns how many of each were ended."""
    from inference import runner
    from inference.models import Query

    if live_names is None:
        live_names = {w["name"] for w in live_workers()}
    now = timezone.now()
    grace = timedelta(seconds=settings.WORKER_HEARTBEAT_TTL)
    lost = (
        Query.objects.filter(status=Query.Status.RUNNING, started_at__lt=now - grace)
        .exclude(worker__in=live_names)
        .values_list("pk", "worker")
    )
    ended = {"worker_lost": 0, "never_taken": 0}
    for query_id, worker in list(lost):
        if runner.fail(
            query_id,
            "worker_lost",
            f"The worker running this query ({worker or 'unknown'}) stopped before it finished.",
            publisher=publisher,
        ):
            ended["worker_lost"] += 1
    stale = Query.objects.filter(
        status=Query.Status.QUEUED, created_at__lt=now - timedelta(seconds=settings.MAX_QUEUED_SECONDS)
    ).values_list("pk", flat=True)
    for query_id in list(stale):
        if runner.fail(
            query_id,
            "worker_lost",
            f"No worker took this query within {settings.MAX_QUEUED_SECONDS:g} s.",
            publisher=publisher,
        ):
            ended["never_taken"] += 1
    # Finished queries whose ender died before settling them (their slot is still held).
    unsettled = Query.objects.filter(
        status__in=[Query.Status.SUCCEEDED, Query.Status.FAILED], settled_at__isnull=True, finished_at__lt=now - grace
    ).values_list("pk", flat=True)
    ended["settled_late"] = sum(1 for query_id in list(unsettled[:1000]) if runner.settle(query_id))
    if any(ended.values()):
        logger.warning("sweeper: %s", ended)
    return ended


def sweep_with_lock(publisher=None) -> dict | None:
    """Run the sweeper unless another worker is running it now."""
    lock = client().lock(_key("sweeper"), timeout=60, blocking=False)
    if not lock.acquire(blocking=False):
        return None
    try:
        return sweep(publisher=publisher)
    finally:
        try:
            lock.release()
        except redis.RedisError:
            pass


class HeartbeatThread(threading.Thread):
    """Keeps a worker's heartbeat fresh and runs the sweeper every SWEEP_INTERVAL_SECONDS."""

    def __init__(self, name: str, info, publisher=None):
        super().__init__(name="sightline-heartbeat", daemon=True)
        self.worker_name = name
        self.info = info  # a callable returning the current heartbeat payload
        self.publisher = publisher
        self._stop_event = threading.Event()

    def run(self) -> None:
        last_sweep = 0.0
        while not self._stop_event.is_set():
            try:
                beat(self.worker_name, self.info())
            except redis.RedisError:
                logger.warning("heartbeat failed", exc_info=True)
            if time.monotonic() - last_sweep >= settings.SWEEP_INTERVAL_SECONDS:
                last_sweep = time.monotonic()
                try:
                    close_old_connections()
                    sweep_with_lock(self.publisher)
                except Exception:
                    logger.exception("sweeper failed")
                finally:
                    close_old_connections()
            self._stop_event.wait(settings.WORKER_HEARTBEAT_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        try:
            forget(self.worker_name)
        except redis.RedisError:
            pass
