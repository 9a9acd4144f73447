"""How a sync request learns that its query ended: the finished signal (inference/events.py), with
the row as the fallback, and no deltas published for a query nobody streams.

The embedded default runs here in-process (its worker thread, the tiny random model: its answers
are noise); the Redis signal runs against the real Redis of TEST_REDIS_URL."""

import asyncio
import os
import uuid

import pytest
from asgiref.sync import async_to_sync

from inference import events, runner, services
from inference.models import Query


@pytest.fixture
def redis_signal(settings):
    settings.EMBEDDED = False
    settings.REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    settings.REDIS_KEY_PREFIX = f"sightline-test-finished-{uuid.uuid4().hex[:8]}"
    yield
    from config import redis as redis_keys

    keys = list(redis_keys.client().scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:*"))
    if keys:
        redis_keys.client().delete(*keys)


@pytest.mark.parametrize("backend", ["embedded", "redis"])
def test_a_signal_is_taken_once_whether_it_came_before_or_after_the_wait(backend, request):
    if backend == "redis":
        request.getfixturevalue("redis_signal")
    query_id = uuid.uuid4()
    assert events.wait_finished(query_id, 0.05) is None  # nothing sent yet
    events.signal_finished(query_id)  # before anyone waits: kept for the waiter
    assert events.wait_finished(query_id, 1.0) == events.Finished(row=None)
    assert events.wait_finished(query_id, 0.05) is None  # taken
    assert events.wait_finished(uuid.uuid4(), 0.05) is None  # another query's is its own


def test_a_signal_sent_while_waiting_wakes_the_waiter(redis_signal):
    query_id = uuid.uuid4()

    async def scenario():
        waiter = asyncio.create_task(asyncio.to_thread(events.wait_finished, query_id, 5.0))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        events.signal_finished(query_id)
        return await asyncio.wait_for(waiter, 5.0)

    assert async_to_sync(scenario)() == events.Finished(row=None)


def _carried_and_left_out(row: Query) -> tuple[dict, dict]:
    left_out = {Query._meta.get_field(name).attname for name in events.ROW_LEFT_OUT}
    carried = {f.attname: f.value_from_object(row) for f in Query._meta.concrete_fields if f.attname not in left_out}
    return carried, left_out


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("backend", ["embedded", "redis"])
def test_a_signal_can_carry_the_row_as_written_with_its_input_deferred(backend, request, api_key):
    """The waiter gets the row without reading it: every field as the database has it, but the
    input (which a metadata-mode query loses when it settles), read from the row when asked for."""
    if backend == "redis":
        request.getfixturevalue("redis_signal")
    api_key, _ = api_key
    data = services.check_input(prompt="carried?", max_tokens=8)
    query = services.accept(api_key, data, endpoint=Query.Endpoint.GLM_INFER)
    Query.objects.filter(pk=query.pk).update(
        status=Query.Status.SUCCEEDED,
        answer="an answer",
        tool_calls=[{"id": "c1", "name": "f", "arguments": "{}"}],
        prompt_tokens=7,
        completion_tokens=3,
        finished_at=query.created_at,
        cost="0.000000123",
    )
    written = Query.objects.get(pk=query.pk)
    events.signal_finished(query.pk, row=written)
    if backend == "redis":  # a row nobody takes (the request gave up) does not stay long
        from config import redis as redis_keys

        ttl = redis_keys.client().ttl(events._RedisFinished._key(query.pk))
        assert 0 < ttl <= events.FINISHED_ROW_TTL_SECONDS < events.FINISHED_SIGNAL_TTL_SECONDS
    Query.objects.filter(pk=query.pk).update(prompt="")  # as a metadata-mode settlement blanks it

    finished = events.wait_finished(query.pk, 1.0)
    assert finished is not None and finished.row is not None
    carried, left_out = _carried_and_left_out(written)
    assert _carried_and_left_out(finished.row)[0] == carried
    assert finished.row.get_deferred_fields() == left_out
    assert finished.row.prompt == ""  # deferred: read from the row as it is now
    assert events.wait_finished(query.pk, 0.05) is None  # taken


@pytest.mark.django_db(transaction=True)
def test_a_lost_signal_costs_one_look_at_the_row(api_key, monkeypatch):
    """The row is the record: a query ended without a signal (taken by another, or Redis away) is
    still seen as ended within POLL_SECONDS."""
    monkeypatch.setattr(services, "POLL_SECONDS", 0.1)
    api_key, _ = api_key
    data = services.check_input(prompt="hello?")
    query = services.accept(api_key, data, endpoint=Query.Endpoint.GLM_INFER)
    assert services.wait_finished(query.pk, 0.3) is None  # queued, never dispatched: no end
    Query.objects.filter(pk=query.pk).update(status=Query.Status.FAILED, error_code="cancelled")
    assert services.wait_finished(query.pk, 5.0) == events.Finished(row=None)  # no signal: the row said so

    runner.fail(query.pk, "cancelled", "again")  # a no-op on an ended query: no signal either
    assert events.wait_finished(query.pk, 0.05) is None


@pytest.mark.django_db(transaction=True)
def test_a_sync_query_publishes_no_deltas_and_a_streamed_one_does(api_key):
    """``stream`` off (the sync endpoints, async jobs): the worker publishes no started, deltas or
    done (nobody subscribed to them); a streamed query (SSE, websocket) gets all of them."""
    from inference.dispatch import get_dispatcher

    api_key, _ = api_key
    assert get_dispatcher().wait_loaded(120)

    def messages_of(stream: bool) -> tuple[Query, list[str]]:
        data = services.check_input(prompt="Count to ten.", max_tokens=12)
        query = services.accept(api_key, data, endpoint=Query.Endpoint.GLM_INFER)

        async def listen():
            seen = []
            async with events.Subscription(query.pk) as subscription:
                if stream:
                    services.dispatch(query)
                    while not seen or seen[-1] not in events.TERMINAL:
                        message = await subscription.next(30)
                        assert message is not None, seen
                        seen.append(message["type"])
                else:
                    await asyncio.to_thread(services.run_sync, query, 60)
                    while (message := await subscription.next(0.3)) is not None:
                        seen.append(message["type"])
            return seen

        seen = async_to_sync(listen)()
        return Query.objects.get(pk=query.pk), seen

    # Streamed first: it also waits out the worker's start-up, whose recovery dispatches every
    # queued row again (streamed, as a message that says nothing does).
    ran, seen = messages_of(stream=True)
    assert ran.status == Query.Status.SUCCEEDED
    assert seen[0] == events.STARTED and events.TOKEN in seen and seen[-1] == events.DONE
    ran, seen = messages_of(stream=False)
    assert ran.status == Query.Status.SUCCEEDED and ran.completion_tokens
    assert seen == []


@pytest.mark.django_db(transaction=True)
def test_a_sync_request_gets_the_settled_row_with_its_signal_and_an_async_job_does_not(api_key):
    """The worker hands a sync request (its endpoint waits) the row as it wrote and settled it: the
    request answers without reading it. An async job's signal carries nothing (nobody takes it)."""
    from inference.dispatch import get_dispatcher

    api_key, _ = api_key
    assert get_dispatcher().wait_loaded(120)
    data = services.check_input(prompt="Count to ten.", max_tokens=12)
    query = services.accept(api_key, data, endpoint=Query.Endpoint.GLM_INFER)
    done = services.run_sync(query, 60)
    stored = Query.objects.get(pk=query.pk)
    assert stored.status == Query.Status.SUCCEEDED and stored.settled_at is not None
    carried, left_out = _carried_and_left_out(stored)
    assert done.get_deferred_fields() == left_out  # it came with the signal: never read
    assert _carried_and_left_out(done)[0] == carried

    job = services.accept(api_key, data, endpoint=Query.Endpoint.QUERIES)
    services.dispatch(job, stream=False)
    assert services.wait_finished(job.pk, 60) == events.Finished(row=None)
    assert Query.objects.get(pk=job.pk).status == Query.Status.SUCCEEDED


@pytest.mark.django_db(transaction=True)
def test_a_stream_waits_for_messages_that_come_after_the_row_ended(api_key, monkeypatch):
    """The worker writes the row, then publishes ``done``; under load the deltas reached the web
    process after the row said "ended" (SSE at concurrency 32 on 2 cores streamed empty answers).
    ``follow`` keeps listening for FINISHED_GRACE_SECONDS after it sees the row ended, and yields
    ``FINISHED`` only when nothing came in that time."""
    monkeypatch.setattr(services, "POLL_SECONDS", 0.2)
    monkeypatch.setattr(services, "FINISHED_GRACE_SECONDS", 1.0)
    api_key, _ = api_key

    def ended_query() -> Query:
        data = services.check_input(prompt="late?")
        query = services.accept(api_key, data, endpoint=Query.Endpoint.CHAT_COMPLETIONS)
        # Ended before anyone runs it: the dispatch in follow() finds nothing queued to run.
        Query.objects.filter(pk=query.pk).update(status=Query.Status.SUCCEEDED, answer="late answer")
        return query

    async def listen(query, late_after: float | None):
        seen = []
        if late_after is not None:

            async def publish_late():
                await asyncio.sleep(late_after)  # the row was seen ended well before this
                publisher = events.Publisher()
                piece = {"choice": 0, "text": "late answer", "reasoning": "", "tool_calls": [], "logprobs": []}
                await asyncio.to_thread(
                    publisher.publish, query.pk, {"type": events.TOKEN, "query_id": str(query.pk), "pieces": [piece]}
                )
                await asyncio.to_thread(publisher.publish, query.pk, {"type": events.DONE, "query_id": str(query.pk)})

            late = asyncio.ensure_future(publish_late())
        async for message in services.follow(query, timeout=30):
            seen.append(message["type"])
        if late_after is not None:
            await late
        return seen

    assert async_to_sync(listen)(ended_query(), 0.6) == [events.TOKEN, events.DONE]
    assert async_to_sync(listen)(ended_query(), None) == [services.FINISHED]
