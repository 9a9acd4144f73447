"""The messages a running query sends to its channel-layer group, and both ends of that exchange.

The worker publishes ``query.started``, coalesced ``query.token`` deltas, then ``query.done`` or
``query.error`` to the group of the query. The web side (an SSE stream or a websocket) subscribes
*before* the query is dispatched, so no early message is missed.

A caller that only waits for the end (the sync endpoints) does not subscribe: the worker sends no
deltas for a query dispatched without ``stream``, and whoever ends a query raises its *finished
signal* (``signal_finished``) once the row holds the outcome. Waiting on it costs one blocking Redis
read in the request's thread (``wait_finished``), where a subscription cost a channel, a group, the
event loop's hops and a message per delta (profile in bench/README.md).
"""

import asyncio
import copy
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, models

from config import redis as redis_keys
from inference.models import Query

logger = logging.getLogger("sightline.events")

STARTED = "query.started"
TOKEN = "query.token"
DONE = "query.done"
ERROR = "query.error"
TERMINAL = (DONE, ERROR)


def group_name(query_id) -> str:
    return f"query.{uuid.UUID(str(query_id)).hex}"


class Publisher:
    """Publishes from synchronous worker code through one long-lived event loop of its own.

    One loop per process keeps one connection pool to Redis (``channels_redis`` pools are per loop)
    and keeps the messages of a query in order: each send is awaited before the next is made.
    """

    def __init__(self, layer=None):
        self._layer = layer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    @property
    def layer(self):
        if self._layer is None:
            self._layer = get_channel_layer()
        return self._layer

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="sightline-publisher", daemon=True)
                thread.start()
                self._loop = loop
            return self._loop

    def publish(self, query_id, message: dict, timeout: float = 5.0) -> None:
        future = asyncio.run_coroutine_threadsafe(
            self.layer.group_send(group_name(query_id), message), self._ensure_loop()
        )
        try:
            future.result(timeout=timeout)
        except Exception:  # a lost message must never fail the query: the row is the record
            logger.warning("could not publish %s for query %s", message.get("type"), query_id, exc_info=True)


class Subscription:
    """``async with Subscription(query_id) as sub: message = await sub.next(timeout)``."""

    def __init__(self, query_id, layer=None):
        self.query_id = query_id
        self.group = group_name(query_id)
        self.layer = layer or get_channel_layer()
        self.channel: str | None = None
        self._receiving: asyncio.Future | None = None

    async def __aenter__(self) -> "Subscription":
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(self.group, self.channel)
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self._receiving is not None:
            self._receiving.cancel()
        if self.channel is not None:
            await self.layer.group_discard(self.group, self.channel)

    async def next(self, timeout: float) -> dict | None:
        """The next message, or None if none came within ``timeout`` seconds.

        A wait that times out leaves its ``receive`` running for the next call instead of
        cancelling it: ``channels_redis`` shares one receive loop among a process's channels, and a
        receive cancelled while it held that loop could leave messages of other channels undelivered
        (a stream at concurrency 32 then ended with its deltas unseen)."""
        if self._receiving is None:
            self._receiving = asyncio.ensure_future(self.layer.receive(self.channel))
        done, _ = await asyncio.wait({self._receiving}, timeout=timeout)
        if not done:
            return None
        receiving, self._receiving = self._receiving, None
        return receiving.result()


# --- the finished signal ------------------------------------------------------------------------
# A signal no one takes (an async job, a client gone) expires after this long; a waiter that comes
# later still finds it within that time, and after it the row says the query ended.
FINISHED_SIGNAL_TTL_SECONDS = 600
# A signal carrying the row lives this long only: its waiter is there already (it waits from the
# dispatch on), and one that gave up (its request timed out) would leave the row in Redis longer.
FINISHED_ROW_TTL_SECONDS = 60
# What a signal carrying the row leaves out: the input (a metadata-mode query loses it when it
# settles). Left out, these fields are deferred: read from the row if the waiter asks for them.
ROW_LEFT_OUT = ("prompt", "messages", "client_ip", "user_agent")


@dataclass(frozen=True)
class Finished:
    """A taken finished signal: ``row``, the query as its ender wrote it (its input deferred), when
    the signal carried it; else None, and the waiter reads the row."""

    row: Query | None = None


def _carried_fields():
    return [field for field in Query._meta.concrete_fields if field.name not in ROW_LEFT_OUT]


def _plain(value):
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    raise TypeError(f"cannot carry a {type(value).__name__}")


def row_payload(query: Query) -> str:
    """The row as the finished signal carries it through Redis (JSON; the input left out)."""
    return json.dumps({field.attname: field.value_from_object(query) for field in _carried_fields()}, default=_plain)


def row_from_payload(text: str | bytes) -> Query:
    """The row ``row_payload`` wrote, as a model instance read from the database (input deferred)."""
    data = json.loads(text)
    names, values = [], []
    for field in _carried_fields():
        names.append(field.attname)
        value = data[field.attname]
        values.append(value if isinstance(field, models.JSONField) else field.to_python(value))
    return Query.from_db(DEFAULT_DB_ALIAS, names, values)


def _without_input(query: Query) -> Query:
    row = copy.copy(query)
    for name in ROW_LEFT_OUT:  # deferred: read from the row when asked for
        row.__dict__.pop(Query._meta.get_field(name).attname, None)
    return row


class _RedisFinished:
    """Production: a one-element Redis list per query, pushed by whoever ended the query (a worker,
    the sweeper, a web process) and popped by the web process that waits (``BLPOP``). The list
    outlives a waiter that is not there yet, so the order of end and wait does not matter. Its
    element is ``1``, or the row (``row_payload``)."""

    @staticmethod
    def _key(query_id) -> str:
        return redis_keys.key("finished", uuid.UUID(str(query_id)).hex)

    def send(self, query_id, row: Query | None = None) -> None:
        key = self._key(query_id)
        element, ttl = (1, FINISHED_SIGNAL_TTL_SECONDS) if row is None else (row_payload(row), FINISHED_ROW_TTL_SECONDS)
        redis_keys.client().pipeline(transaction=False).rpush(key, element).expire(key, ttl).execute()

    def wait(self, query_id, timeout: float) -> Finished | None:
        popped = redis_keys.client().blpop([self._key(query_id)], timeout=max(timeout, 0.001))
        if popped is None:
            return None
        element = popped[1]
        if element in (b"1", "1"):
            return Finished()
        try:
            return Finished(row_from_payload(element))
        except Exception:  # noqa: BLE001 - a payload of another release: the row says the same
            logger.warning("could not read the row carried by the signal of query %s", query_id, exc_info=True)
            return Finished()


class _LocalFinished:
    """The embedded default: the worker threads and the waiting requests share the process."""

    def __init__(self):
        self._condition = threading.Condition()
        self._ended: dict[str, tuple[float, Query | None]] = {}  # query id -> (when, row), oldest first

    def send(self, query_id, row: Query | None = None) -> None:
        now = time.monotonic()
        with self._condition:
            self._ended[str(query_id)] = (now, None if row is None else _without_input(row))
            while self._ended:  # forget signals nobody took (an async job's)
                oldest, (at, _row) = next(iter(self._ended.items()))
                if now - at < FINISHED_SIGNAL_TTL_SECONDS:
                    break
                del self._ended[oldest]
            self._condition.notify_all()

    def wait(self, query_id, timeout: float) -> Finished | None:
        key = str(query_id)
        with self._condition:
            if self._condition.wait_for(lambda: key in self._ended, timeout):
                _at, row = self._ended.pop(key)
                return Finished(row)
            return None


_local_finished = _LocalFinished()
_redis_finished = _RedisFinished()


def _finished_signal():
    return _local_finished if settings.EMBEDDED else _redis_finished


def signal_finished(query_id, row: Query | None = None) -> None:
    """Tell a waiter that the query's row now holds its outcome; ``row``, the row as written, spares
    the waiter reading it. Only for a query whose caller waits on the signal (a sync request): one
    nobody takes holds its row until it expires. Never raises: a lost signal costs the waiter at
    most one poll of the row (services.wait_finished)."""
    try:
        _finished_signal().send(query_id, row)
    except Exception:  # noqa: BLE001 - Redis away: the waiter finds the outcome in the row
        logger.warning("could not signal the end of query %s", query_id, exc_info=True)


def wait_finished(query_id, timeout: float) -> Finished | None:
    """The query's finished signal once it came (taking it), None after ``timeout`` seconds.
    Raises on a Redis error (the caller falls back to the row)."""
    return _finished_signal().wait(query_id, timeout)
