"""What workers share through Redis: heartbeats, cancel flags, and the sweeper of stuck queries.

* Each Celery worker writes ``<prefix>:worker:<name>`` every WORKER_HEARTBEAT_SECONDS with a TTL of
  WORKER_HEARTBEAT_TTL: its queue, model, whether the model is loaded, and the query it runs.
  ``/health/ready`` reads these, per model (each registered model's queue).
* A client that cancels (or disconnects) sets ``<prefix>:cancel:<query id>``; the worker running
  that query checks it between tokens and stops.
* The sweeper fails ``running`` queries whose worker has no heartbeat any more (``worker_lost``)
  and ``queued`` queries no worker took within MAX_QUEUED_SECONDS; settles outcomes and admissions
  whose process died before settling them; and after Redis lost its data, rebuilds the quota
  counters from PostgreSQL and dispatches the queued queries again. Every worker runs it from its
  heartbeat thread, one at a time across workers by a Redis lock; ``manage.py sweep_queries`` runs
  it by hand or from cron. One sweeper serves every registered model: what it dispatches again goes
  to the queue of the query's model.
* The pruner (inference/privacy.py) removes what the tenants' retention and privacy modes do not
  keep, every PRUNE_INTERVAL_SECONDS, in a thread of its own (a long pass never delays a
  heartbeat), one worker at a time by a Redis lock; ``manage.py prune_queries`` runs it by hand.
"""

import json
import logging
import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from datetime import UTC, timedelta

import redis
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from accounts import quotas
from config import models_registry, money
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
def heartbeat_present(name: str) -> bool:
    return bool(client().exists(_key("worker", name)))


def sweep(
    live_names: set[str] | None = None,
    publisher=None,
    *,
    own: str | None = None,
    running=(),
    judge_lost: bool = True,
) -> dict:
    """End what no one will end: queries on dead workers, queries never taken, outcomes never
    settled, admissions whose row was never written; after Redis lost its data, rebuild the quota
    counters from the rows and dispatch the queued queries again. Returns counts of each.

    ``own`` and ``running`` (the sweeping worker's name and the queries it runs) are never failed.
    ``judge_lost`` False skips failing queries as ``worker_lost``: the caller could not reach
    Redis a moment ago, so a missing heartbeat may only mean its owner could not reach it either.
    """
    from inference import runner
    from inference.models import Query

    ended = {"worker_lost": 0, "never_taken": 0, "redelivered": 0, "dispatched_again": 0}
    ended.update(recover_lost_redis())
    now = timezone.now()
    grace = timedelta(seconds=settings.WORKER_HEARTBEAT_TTL)
    if judge_lost:
        live = live_workers()
        if live_names is None:
            live_names = {w["name"] for w in live}
        # The queries live workers hold (waiting for a batch or for their engine server, queued still).
        held_by_live = {str(q) for w in live for q in w.get("current_queries", [])} | {str(q) for q in running if q}
        lost = (
            Query.objects.filter(status=Query.Status.RUNNING, started_at__lt=now - grace)
            .exclude(worker__in=[*live_names, *([own] if own else [])])
            .exclude(pk__in=[str(query_id) for query_id in running if query_id])
            .values_list("pk", "worker")
        )
        for query_id, worker in list(lost):
            if worker and heartbeat_present(worker):  # it beat since live_names was read: alive
                continue
            if runner.fail(
                query_id,
                "worker_lost",
                f"The worker running this query ({worker or 'unknown'}) stopped before it finished.",
                publisher=publisher,
            ):
                ended["worker_lost"] += 1
        # Queued queries whose message a dead worker holds, or whose web process died before
        # sending it: queued again now, rather than after the broker's visibility timeout or
        # MAX_QUEUED_SECONDS.
        from inference.dispatch import get_dispatcher

        ended.update(
            get_dispatcher().recover_orphans(
                unclaimed_after=settings.UNCLAIMED_REDELIVER_SECONDS,
                undispatched_after=settings.UNDISPATCHED_QUEUED_SECONDS,
                held_by_live=held_by_live,
            )
        )
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
    ended["admissions_released"] = release_abandoned_admissions()
    if any(ended.values()):
        logger.warning("sweeper: %s", ended)
    return ended


def release_abandoned_admissions(limit: int = 1000) -> int:
    """Admissions still without a row ADMISSION_LEASE_SECONDS after they were made: their web
    process died (or gave up) between admission and commit. Their reservation is refunded and
    their slot freed; those that have a row are left to the row's own settling."""
    from inference.models import Query

    backend = quotas.backend()
    older_than = quotas.now() - timedelta(seconds=settings.ADMISSION_LEASE_SECONDS)
    pending = backend.pending(older_than)[:limit]
    if not pending:
        return 0
    rows = {
        query.pk.hex: query
        for query in Query.objects.filter(pk__in=[uuid.UUID(member) for _, member, _ in pending]).only(
            "id", "status", "created_at", "settled_at", "prompt_tokens", "completion_tokens", "cost"
        )
    }
    released = 0
    for key_id, member, since in pending:
        row = rows.get(member)
        if row is None:
            released += backend.settle(key_id, member, 0, if_pending_since=since)
        elif row.settled_at is not None:
            # Settled, yet still held: re-added by a rebuild that read the row just before its
            # settling. Settle it again (this refunds only if the reservation is still held).
            backend.settle(key_id, member, row.total_tokens or 0, cost=money.to_nano(row.cost))
        else:
            slot_until = None if row.is_finished else row.created_at + timedelta(milliseconds=quotas.slot_lease_ms())
            backend.adopt(key_id, member, slot_until)
    return released


def restore_quotas() -> int:
    """Rebuild every key's day and month counters from PostgreSQL: the usage rollups of the month
    plus the reservations of the rows not settled yet (which hold their slots while unfinished);
    and each tenant's spend counter, shared by its keys, likewise (its rollups' spend plus the
    reserved cost its keys hold). Returns how many keys were rebuilt."""
    from accounts.models import ApiKey
    from inference.models import Query, UsageDaily

    at = quotas.now()
    today = at.date()
    day_requests: dict[int, int] = defaultdict(int)
    month_tokens: dict[int, int] = defaultdict(int)
    month_spend: dict[int, int] = defaultdict(int)
    tenant_spend: dict[int, int] = defaultdict(int)
    held: dict[int, list[quotas.Held]] = defaultdict(list)
    rollups = UsageDaily.objects.filter(date__gte=today.replace(day=1), date__lte=today)
    for tenant_id, key_id, date, requests, prompt, completion, spend in rollups.values_list(
        "tenant_id", "api_key_id", "date", "requests", "prompt_tokens", "completion_tokens", "spend"
    ):
        if tenant_id is not None:
            tenant_spend[tenant_id] += money.to_nano(spend)
        if key_id is None:
            continue
        month_tokens[key_id] += prompt + completion
        month_spend[key_id] += money.to_nano(spend)
        if date == today:
            day_requests[key_id] += requests
    unsettled = Query.objects.filter(settled_at__isnull=True, api_key__isnull=False).values_list(
        "pk", "api_key_id", "created_at", "reserved_tokens", "status", "reserved_cost", "tenant_id"
    )
    for query_id, key_id, created_at, reserved, status, reserved_cost, tenant_id in unsettled.iterator():
        created = created_at.astimezone(UTC)
        if created.date() == today:
            day_requests[key_id] += 1
        unfinished = status in (Query.Status.QUEUED, Query.Status.RUNNING)
        held[key_id].append(
            quotas.Held(
                member=query_id.hex,
                day=created.strftime("%Y-%m-%d"),
                reserve=reserved,
                unfinished=unfinished,
                created_ms=int(created.timestamp() * 1000),
                cost=money.to_nano(reserved_cost),
                tenant_id=tenant_id,
            )
        )
    backend = quotas.backend()
    keys = set(day_requests) | set(month_tokens) | set(held) | set(month_spend)
    for key_id in keys:
        backend.restore(
            key_id,
            at,
            day_requests=day_requests[key_id],
            month_tokens=month_tokens[key_id],
            held=held[key_id],
            month_spend=month_spend[key_id],
        )
    # Each tenant's shared counter, from the held hashes of all its keys (restored just above).
    tenant_keys: dict[int, list[int]] = defaultdict(list)
    for key_id, tenant_id in ApiKey.objects.values_list("pk", "tenant_id"):
        tenant_keys[tenant_id].append(key_id)
    for tenant_id in set(tenant_spend) | {t for t, ks in tenant_keys.items() if set(ks) & keys}:
        backend.restore_tenant(tenant_id, at, month_spend=tenant_spend[tenant_id], key_ids=tenant_keys[tenant_id])
    # A row settled between the read above and its restore got its reservation back in Redis
    # (its own settling found none to refund): settle those again now.
    restored = [uuid.UUID(item.member) for items in held.values() for item in items]
    for key_id, query_id, prompt, completion, cost in Query.objects.filter(
        pk__in=restored, settled_at__isnull=False
    ).values_list("api_key_id", "pk", "prompt_tokens", "completion_tokens", "cost"):
        backend.settle(key_id, query_id.hex, (prompt or 0) + (completion or 0), cost=money.to_nano(cost))
    return len(keys)


def recover_lost_redis() -> dict:
    """When Redis lost its data (restarted without persistence, or flushed), which the missing
    ``restored`` marker shows: rebuild the quota counters from the rows, and dispatch again the
    queued queries, whose messages were lost with it (a query already taken is not run twice: the
    claim ``queued -> running`` lets one worker only run it)."""
    from inference.dispatch import get_dispatcher
    from inference.models import Query

    backend = quotas.backend()
    if backend.restored():
        return {}
    at = quotas.now()
    keys = restore_quotas()
    dispatcher = get_dispatcher()
    # Every registered model's queued rows, each to its model's queue.
    queued = Query.objects.filter(status=Query.Status.QUEUED, model__in=models_registry.names())
    requeued = 0
    for query_id, model in queued.order_by("created_at").values_list("pk", "model").iterator():
        dispatcher.submit(query_id, model)
        requeued += 1
    backend.mark_restored(at)
    logger.warning("quota counters of %d keys rebuilt; %d queued queries dispatched again", keys, requeued)
    return {"keys_restored": keys, "redispatched": requeued}


# The lock of a periodic duty shared by the workers (the sweeper's, the pruner's) lives this long
# unless its holder renews it (every third of it, while the duty runs). The sweeper's was 60 s with
# no renewal: a worker SIGKILLed mid-sweep (it sweeps every second) left it held for a minute, and
# no query it had been running ended worker_lost meanwhile; the pruner's, PRUNE_PASS_SECONDS + 120.
DUTY_LOCK_SECONDS = 10.0


@contextmanager
def duty_lock(name: str):
    """Hold the Redis lock of the duty ``name`` while the block runs, however long it takes: the
    block gets True, or False (holding nothing) when another worker holds it. A holder that died
    keeps it at most DUTY_LOCK_SECONDS."""
    # thread_local=False: the renewing thread must see the token the acquiring thread got.
    lock = client().lock(_key(name), timeout=DUTY_LOCK_SECONDS, blocking=False, thread_local=False)
    if not lock.acquire(blocking=False):
        yield False
        return
    done = threading.Event()

    def renew():
        while not done.wait(DUTY_LOCK_SECONDS / 3):
            try:
                lock.extend(DUTY_LOCK_SECONDS, replace_ttl=True)
            except redis.RedisError:  # lost it (Redis away, or expired: a LockError): the duty ends anyway
                logger.warning("could not renew the %s's lock", name, exc_info=True)
                return

    renewer = threading.Thread(target=renew, name=f"sightline-{name}-lock", daemon=True)
    renewer.start()
    try:
        yield True
    finally:
        done.set()
        renewer.join()
        try:
            lock.release()
        except redis.RedisError:
            pass


def sweep_with_lock(publisher=None, **options) -> dict | None:
    """Run the sweeper unless another worker is running it now (``duty_lock``)."""
    with duty_lock("sweeper") as held:
        return sweep(publisher=publisher, **options) if held else None


class HeartbeatThread(threading.Thread):
    """Keeps a worker's heartbeat fresh and runs the sweeper every SWEEP_INTERVAL_SECONDS.

    The sweeper runs only right after this worker's own heartbeat was written (Redis is reachable
    now), and judges other workers lost only once Redis has been reachable for a whole
    WORKER_HEARTBEAT_TTL: a heartbeat that lapsed while Redis was unreachable says nothing about
    its worker, which gets that long to beat again."""

    def __init__(self, name: str, info, publisher=None):
        super().__init__(name="sightline-heartbeat", daemon=True)
        self.worker_name = name
        self.info = info  # a callable returning the current heartbeat payload
        self.publisher = publisher
        self._stop_event = threading.Event()

    def run(self) -> None:
        last_sweep = 0.0
        reachable_since: float | None = time.monotonic() - settings.WORKER_HEARTBEAT_TTL
        while not self._stop_event.is_set():
            payload = self.info()
            try:
                beat(self.worker_name, payload)
                if reachable_since is None:
                    reachable_since = time.monotonic()
            except redis.RedisError:
                reachable_since = None
                logger.warning("heartbeat failed", exc_info=True)
            now = time.monotonic()
            if reachable_since is not None and now - last_sweep >= settings.SWEEP_INTERVAL_SECONDS:
                last_sweep = now
                try:
                    close_old_connections()
                    sweep_with_lock(
                        self.publisher,
                        own=self.worker_name,
                        running=payload.get("current_queries", []),
                        judge_lost=now - reachable_since >= settings.WORKER_HEARTBEAT_TTL,
                    )
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


# --- the pruner ---------------------------------------------------------------------------------
def prune_with_lock() -> dict | None:
    """One pruning pass (at most PRUNE_PASS_SECONDS), unless another worker is running one now."""
    from inference import privacy

    if settings.EMBEDDED:  # one process: nobody to share with
        return privacy.prune(seconds=settings.PRUNE_PASS_SECONDS)
    with duty_lock("pruner") as held:
        return privacy.prune(seconds=settings.PRUNE_PASS_SECONDS) if held else None


class PrunerThread(threading.Thread):
    """Runs ``prune_with_lock`` every PRUNE_INTERVAL_SECONDS (the first pass one interval after the
    start), beside the heartbeat thread of a worker or the embedded default's worker thread."""

    def __init__(self, interval: float | None = None):
        super().__init__(name="sightline-pruner", daemon=True)
        self.interval = settings.PRUNE_INTERVAL_SECONDS if interval is None else interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                close_old_connections()
                prune_with_lock()
            except Exception:
                logger.exception("pruner failed")
            finally:
                close_old_connections()

    def stop(self) -> None:
        self._stop_event.set()


def start_pruner() -> PrunerThread | None:
    """Start the pruner thread unless PRUNE_INTERVAL_SECONDS is 0 (cron runs prune_queries)."""
    if settings.PRUNE_INTERVAL_SECONDS <= 0:
        return None
    pruner = PrunerThread()
    pruner.start()
    return pruner


def batch_info(engine) -> dict:
    """What a worker's batch scheduler is doing, for its heartbeat and /metrics: the rows of the
    batch decoding now, the largest batch so far, and the tokens/s of the last batch."""
    own = getattr(engine, "batch_info", None)
    if callable(own):  # an engine server's client: its queries in flight there
        return own()
    scheduler = getattr(engine, "scheduler", None)
    if scheduler is None:
        return {"batch_rows": 0, "max_batch_rows": 0, "tokens_per_second": 0.0}
    return {
        "batch_rows": scheduler.batch_rows,
        "max_batch_rows": scheduler.max_batch_rows,
        "tokens_per_second": scheduler.tokens_per_second,
    }
