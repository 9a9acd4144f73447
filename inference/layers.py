"""A channel layer for the embedded default that is safe to use from several threads.

Channels' own ``InMemoryChannelLayer`` keeps ``asyncio.Queue`` objects that belong to one event
loop. In the embedded default the publisher is the worker *thread* (not the web server's loop), so
a message must be handed to the receiver's loop with ``call_soon_threadsafe``. This layer does
exactly that; the rest follows channels' in-memory semantics (capacity, groups, flush). Production
uses ``channels_redis`` instead, and the code above the layer is the same.
"""

import asyncio
import itertools
import random
import string
import threading
from collections import deque
from copy import deepcopy

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer


class _Mailbox:
    __slots__ = ("loop", "queue", "pending")

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue | None = None
        self.pending: deque = deque()  # messages that arrived before a receiver bound a loop

    def size(self) -> int:
        return len(self.pending) + (self.queue.qsize() if self.queue is not None else 0)


class ThreadSafeInMemoryChannelLayer(BaseChannelLayer):
    extensions = ["groups", "flush"]

    def __init__(self, expiry=60, group_expiry=86400, capacity=1000, channel_capacity=None, **kwargs):
        super().__init__(expiry=expiry, capacity=capacity, channel_capacity=channel_capacity)
        self.channel_capacity = self.compile_capacities(self.channel_capacity)
        self.group_expiry = group_expiry
        self._lock = threading.Lock()
        self._mailboxes: dict[str, _Mailbox] = {}
        self._groups: dict[str, set[str]] = {}
        self._counter = itertools.count()
        self._client_prefix = "".join(random.choice(string.ascii_letters) for _ in range(8))

    # --- channels ---------------------------------------------------------------------------
    async def new_channel(self, prefix="specific."):
        name = f"{prefix}inmemory!{self._client_prefix}{next(self._counter)}"
        self._bind(name, asyncio.get_running_loop())
        return name

    def _bind(self, channel: str, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        with self._lock:
            box = self._mailboxes.setdefault(channel, _Mailbox())
            if box.loop is not loop:
                # First receive, or the receiver moved to another loop: carry queued messages over.
                queue: asyncio.Queue = asyncio.Queue()
                if box.queue is not None:
                    while not box.queue.empty():
                        queue.put_nowait(box.queue.get_nowait())
                while box.pending:
                    queue.put_nowait(box.pending.popleft())
                box.loop, box.queue = loop, queue
            return box.queue

    async def send(self, channel, message):
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        assert "__asgi_channel__" not in message
        self._deliver(channel, deepcopy(message))

    def _deliver(self, channel: str, message: dict) -> None:
        with self._lock:
            box = self._mailboxes.setdefault(channel, _Mailbox())
            if box.size() >= self.get_capacity(channel):
                raise ChannelFull(channel)
            if box.queue is None:
                box.pending.append(message)
                return
            loop, queue = box.loop, box.queue
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            queue.put_nowait(message)
        elif loop.is_closed():
            with self._lock:
                self._mailboxes.pop(channel, None)
        else:
            loop.call_soon_threadsafe(queue.put_nowait, message)

    async def receive(self, channel):
        self.require_valid_channel_name(channel)
        queue = self._bind(channel, asyncio.get_running_loop())
        return await queue.get()

    # --- groups -----------------------------------------------------------------------------
    async def group_add(self, group, channel):
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        with self._lock:
            self._groups.setdefault(group, set()).add(channel)

    async def group_discard(self, group, channel):
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        with self._lock:
            members = self._groups.get(group)
            if members is not None:
                members.discard(channel)
                if not members:
                    del self._groups[group]
            # A process-specific channel that left its last group is done: free its mailbox.
            if "!" in channel and not any(channel in m for m in self._groups.values()):
                self._mailboxes.pop(channel, None)

    async def group_send(self, group, message):
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_group_name(group)
        with self._lock:
            members = list(self._groups.get(group, ()))
        for channel in members:
            try:
                self._deliver(channel, deepcopy(message))
            except ChannelFull:
                pass  # as channels' layers do: a full member misses the message

    # --- flush ------------------------------------------------------------------------------
    async def flush(self):
        with self._lock:
            self._mailboxes.clear()
            self._groups.clear()

    async def close(self):
        pass
