"""The messages a running query sends to its channel-layer group, and both ends of that exchange.

The worker publishes ``query.started``, coalesced ``query.token`` deltas, then ``query.done`` or
``query.error`` to the group of the query. The web side (a sync request, an SSE stream or a
websocket) subscribes *before* the query is dispatched, so no early message is missed.
"""

import asyncio
import logging
import threading
import uuid

from channels.layers import get_channel_layer

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

    async def __aenter__(self) -> "Subscription":
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(self.group, self.channel)
        return self

    async def __aexit__(self, *exc_info) -> None:
        if self.channel is not None:
            await self.layer.group_discard(self.group, self.channel)

    async def next(self, timeout: float) -> dict | None:
        """The next message, or None if none came within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.layer.receive(self.channel), timeout)
        except TimeoutError:
            return None
