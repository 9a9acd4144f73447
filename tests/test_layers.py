"""The embedded default's channel layer: messages published from a plain thread reach a receiver's loop."""

import asyncio
import threading

from asgiref.sync import async_to_sync

from inference.layers import ThreadSafeInMemoryChannelLayer


async def test_group_send_from_another_thread_arrives_in_order():
    layer = ThreadSafeInMemoryChannelLayer()
    channel = await layer.new_channel()
    await layer.group_add("query.abc", channel)

    def publish():
        for i in range(50):
            async_to_sync(layer.group_send)("query.abc", {"type": "query.token", "i": i})

    thread = threading.Thread(target=publish)
    thread.start()
    received = [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(50)]
    thread.join()
    assert [m["i"] for m in received] == list(range(50))


async def test_groups_are_isolated_and_discard_frees_the_channel():
    layer = ThreadSafeInMemoryChannelLayer()
    a, b = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("query.a", a)
    await layer.group_add("query.b", b)
    await layer.group_send("query.a", {"type": "x", "to": "a"})
    assert (await asyncio.wait_for(layer.receive(a), 1))["to"] == "a"
    assert layer._mailboxes[b].size() == 0
    await layer.group_discard("query.a", a)
    assert a not in layer._mailboxes
