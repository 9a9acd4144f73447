"""The production path with real processes: Uvicorn + Celery worker + Redis + PostgreSQL.

The tiny model's answers are random noise; tests check frames, order, rows and codes."""

import asyncio
import base64
import json
import subprocess
import time
import uuid

import pytest
import websockets

from accounts import services as accounts
from inference.models import Query
from tests import media
from tests.conftest import free_port
from tests.stack import Stack, get_json, post_json, wait_finished

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def key(tenant):
    return accounts.create_api_key(tenant, "prod")[1]


def _image_b64(seed=0) -> str:
    return base64.b64encode(media.encode(media.image(64, 64, seed=seed), "PNG")).decode()


def test_rest_infer_runs_on_the_celery_worker(live_stack, key):
    status, body = post_json(
        live_stack.url + "/v1/glm/infer", {"image": _image_b64(), "prompt": "What?", "max_tokens": 8}, key
    )
    assert status == 200, body
    assert body["code"] == 0 and body["result"]
    query = Query.objects.get(pk=body["query_id"])
    assert query.status == Query.Status.SUCCEEDED and query.answer == body["result"]
    assert query.worker.startswith("w1-")


async def _stream(
    ws_url, key, prompt="Describe the picture.", max_tokens=24, seed=0, cancel_after=None, close_after=None
):
    """Run one query over the websocket; returns the frames received."""
    frames = []
    async with websockets.connect(
        ws_url + "/ws/v1/infer", additional_headers={"Authorization": f"Bearer {key}"}, max_size=None
    ) as ws:
        frames.append(json.loads(await ws.recv()))  # ready
        await ws.send(
            json.dumps({"type": "infer", "prompt": prompt, "image": _image_b64(seed), "max_tokens": max_tokens})
        )
        tokens = 0
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            frames.append(frame)
            if frame["type"] == "token":
                tokens += 1
                if cancel_after is not None and tokens == cancel_after:
                    await ws.send(json.dumps({"type": "cancel"}))
                if close_after is not None and tokens == close_after:
                    return frames  # leaving the block closes the connection
            if frame["type"] in ("done", "error"):
                return frames


def test_websocket_streams_tokens_in_order_that_join_to_the_answer(live_stack, key):
    frames = asyncio.run(_stream(live_stack.ws_url, key))
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "ready" and kinds[1] == "queued" and kinds[-1] == "done", kinds
    assert "token" in kinds
    assert kinds.index("token") > kinds.index("queued")
    query_id = frames[1]["query_id"]
    assert all(f["query_id"] == query_id for f in frames[1:])
    text = "".join(f["text"] for f in frames if f["type"] == "token")
    done = frames[-1]
    assert text == done["result"]
    query = Query.objects.get(pk=query_id)
    assert query.answer == text and query.endpoint == Query.Endpoint.WEBSOCKET
    assert done["usage"]["completion_tokens"] == query.completion_tokens
    assert done["cost_time"] > 0


def test_two_tenants_streaming_at_once_never_see_each_others_frames(live_stack, key):
    other_key = accounts.create_api_key(accounts.create_tenant("Other", slug="other"), "k")[1]

    async def both():
        return await asyncio.gather(
            _stream(live_stack.ws_url, key, seed=1, max_tokens=32),
            _stream(live_stack.ws_url, other_key, seed=2, max_tokens=32),
        )

    first, second = asyncio.run(both())
    for frames, slug in ((first, "acme"), (second, "other")):
        query_id = frames[1]["query_id"]
        assert frames[-1]["type"] == "done"
        assert {f.get("query_id") for f in frames[1:]} == {query_id}
        assert Query.objects.get(pk=query_id).tenant.slug == slug
    assert first[1]["query_id"] != second[1]["query_id"]


def test_cancel_stops_generation_and_keeps_the_partial_answer(live_stack, key):
    frames = asyncio.run(_stream(live_stack.ws_url, key, max_tokens=1000, cancel_after=1))
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "cancelled", frames[-1]
    query = wait_finished(frames[1]["query_id"])
    assert query.status == Query.Status.FAILED and query.error_code == "cancelled"
    # Stopped by the cancel (not by max_tokens), and the partial answer kept is exactly what was
    # streamed: the runner flushes every delta before it writes the outcome and sends the error.
    assert query.finish_reason == "cancelled" and 1 <= query.completion_tokens < 1000
    assert query.answer and query.answer == "".join(f["text"] for f in frames if f["type"] == "token")


def test_disconnect_cancels_the_query(live_stack, key):
    frames = asyncio.run(_stream(live_stack.ws_url, key, max_tokens=1000, close_after=1))
    query = wait_finished(frames[1]["query_id"])
    assert query.status == Query.Status.FAILED and query.error_code == "cancelled"
    assert query.finish_reason == "cancelled" and 1 <= query.completion_tokens < 1000
    assert query.answer.startswith("".join(f["text"] for f in frames if f["type"] == "token"))


def test_websocket_auth_by_first_frame_and_refusal(live_stack, key):
    async def run():
        async with websockets.connect(live_stack.ws_url + "/ws/v1/infer") as ws:
            await ws.send(json.dumps({"type": "infer", "prompt": "x"}))
            refused = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "auth", "api_key": key}))
            ready = json.loads(await ws.recv())
        async with websockets.connect(live_stack.ws_url + "/ws/v1/infer") as ws:
            await ws.send(json.dumps({"type": "auth", "api_key": "sl_AAAAAAAA_" + "a" * 32}))
            bad = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        return refused, ready, bad, closed.value.rcvd.code

    refused, ready, bad, close_code = asyncio.run(run())
    assert refused["type"] == "error" and refused["code"] == "unauthorized"
    assert ready == {"type": "ready"}
    assert bad["code"] == "unauthorized" and close_code == 4401


def test_websocket_bad_input_gets_an_error_frame(live_stack, key):
    async def run():
        async with websockets.connect(live_stack.ws_url + "/ws/v1/infer", additional_headers={"X-API-Key": key}) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "infer", "prompt": "", "image": _image_b64()}))
            return json.loads(await ws.recv())

    frame = asyncio.run(run())
    assert frame["type"] == "error" and frame["code"] == "invalid_request"
    assert Query.objects.count() == 0


def test_async_job_202_then_poll_to_succeeded(live_stack, key):
    status, body = post_json(
        live_stack.url + "/v1/queries", {"image": _image_b64(), "prompt": "What?", "max_tokens": 8}, key
    )
    assert status == 202, body
    assert body["poll_url"].endswith(f"/v1/queries/{body['id']}")
    for _ in range(300):
        status, polled = get_json(body["poll_url"], key)
        assert status == 200
        if polled["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert polled["status"] == "succeeded"
    assert polled["answer"] and polled["usage"]["completion_tokens"] > 0
    assert polled["timings"]["total_seconds"] > 0
    status, listing = get_json(live_stack.url + "/v1/queries", key)
    assert status == 200 and listing["results"][0]["id"] == body["id"]
    other_key = accounts.create_api_key(accounts.create_tenant("Other", slug="other"), "k")[1]
    status, hidden = get_json(body["poll_url"], other_key)
    assert status == 404 and hidden["code"] == "not_found"
    assert get_json(live_stack.url + "/v1/queries", other_key)[1]["results"] == []


def test_killed_worker_loses_nothing(tenant, tmp_path):
    """SIGKILL a worker mid-generation, start another: the queries the dead one had started (its
    batch: the long first one and any that joined it) are ended worker_lost by the new worker's
    sweeper once the dead one's heartbeat expires (WORKER_HEARTBEAT_TTL); every other query of 20
    succeeds on the new worker, each run once; none stays queued or running; every slot and token is
    settled."""
    from django.utils import timezone

    row, key = accounts.create_api_key(tenant, "many", max_concurrent_requests=50)
    stack = Stack(tmp_path)
    stack.start_web()
    stack.start_worker("doomed")
    try:
        stack.wait_ready()
        ids = []
        for i in range(20):
            # The first (the first the worker takes) is long, so that the kill lands in its generation
            # rather than in the few milliseconds between two queries.
            max_tokens = 1000 if i == 0 else 16
            status, body = post_json(
                stack.url + "/v1/queries", {"image": _image_b64(i), "prompt": f"q{i}", "max_tokens": max_tokens}, key
            )
            assert status == 202, body
            ids.append(body["id"])
        for _ in range(600):  # wait (bounded) until the first is running on the doomed worker
            if Query.objects.filter(pk=ids[0], status=Query.Status.RUNNING).exists():
                break
            time.sleep(0.05)
        stack.kill("doomed")
        killed_at = timezone.now()
        stack.start_worker("rescuer")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if Query.objects.filter(pk__in=ids, status__in=[Query.Status.QUEUED, Query.Status.RUNNING]).count() == 0:
                break
            time.sleep(0.5)
        rows = {str(q.pk): q for q in Query.objects.filter(pk__in=ids)}
        assert len(rows) == 20
        assert rows[ids[0]].worker.startswith("doomed-")  # the long one was in the dead worker's batch
        lost = {k: q for k, q in rows.items() if q.worker.startswith("doomed-")}
        for q in lost.values():
            assert (q.status, q.error_code) == (Query.Status.FAILED, "worker_lost"), (q.status, q.error_code)
            assert q.worker in q.error_message and q.started_at < killed_at
            assert q.finished_at > killed_at  # ended by the rescuer's sweeper: the web process never sweeps
        assert rows[ids[0]].completion_tokens is None  # it died before writing any
        rescued = {k: q for k, q in rows.items() if k not in lost}
        assert rescued, "the dead worker had taken all 20"
        assert [q.status for q in rescued.values()] == [Query.Status.SUCCEEDED] * len(rescued), [
            (q.status, q.error_code) for q in rescued.values()
        ]
        # Each ran once, on the rescuer: one claim (its worker and its one started_at, after the kill).
        assert all(q.worker.startswith("rescuer-") and q.started_at > killed_at for q in rescued.values())
        assert all(q.completion_tokens == 16 for q in rescued.values())
        # Celery logs "succeeded in" after the task returns, which is after the row's outcome is written.
        for _ in range(150):
            log = stack.log("rescuer")
            if log.count("succeeded in") >= len(rescued):
                break
            time.sleep(0.2)
        assert log.count("succeeded in") >= len(rescued), log  # run by the rescuer,
        assert "not running it again" not in log  # none of them a second delivery
        for _ in range(150):  # freed after the outcome is written, or by the sweeper if the ender died
            status, usage = get_json(stack.url + "/v1/usage", key)
            if usage["key"]["quotas"]["concurrent_requests"]["used"] == 0:
                break
            time.sleep(0.1)
        assert usage["key"]["quotas"]["concurrent_requests"]["used"] == 0
        used = sum(q.total_tokens for q in rescued.values())  # the lost ones' reservations were refunded whole
        assert usage["key"]["quotas"]["tokens_per_month"]["used"] == used
    finally:
        stack.stop()


def test_a_query_a_dead_worker_took_but_never_started_runs_at_once_elsewhere(tenant, tmp_path):
    """A worker holds a batch's worth of messages; one SIGKILLed before it started some leaves them
    unacknowledged in Redis, where the broker hands them out again only after its visibility timeout
    (the hard time limit + 60 s). A real Celery consumer takes the message and dies (os._exit, no
    goodbye); a worker started next gives it back to the queue after UNCLAIMED_REDELIVER_SECONDS and runs it."""
    import sys

    from tests.conftest import REPO

    _, key = accounts.create_api_key(tenant, "held")
    stack = Stack(tmp_path)
    stack.start_web()
    try:
        stack.wait_web()
        status, body = post_json(
            stack.url + "/v1/queries", {"image": _image_b64(), "prompt": "x", "max_tokens": 8}, key
        )
        assert status == 202, body
        take_and_die = (
            "import os, django; django.setup()\n"
            # Redis has lost nothing here: say so, as a running deployment's sweeper has, or the
            # rescuer would dispatch every queued query again as after a Redis restart.
            "from accounts import quotas; quotas.backend().mark_restored(quotas.now())\n"
            "from config.celery import app\n"
            "with app.connection_for_read() as connection:\n"
            f"    message = connection.SimpleQueue({stack.queue!r}, no_ack=False).get(timeout=30)\n"
            "    print(message.headers['task'], flush=True)\n"
            "    os._exit(0)\n"
        )
        taken = subprocess.run(
            [sys.executable, "-c", take_and_die], cwd=REPO, env=stack.env, capture_output=True, text=True, timeout=120
        )
        assert taken.stdout.strip() == "inference.run_query", taken.stderr
        assert Query.objects.get(pk=body["id"]).status == Query.Status.QUEUED
        stack.start_worker("rescuer")
        deadline = time.monotonic() + 90
        while (query := Query.objects.get(pk=body["id"])).status in (Query.Status.QUEUED, Query.Status.RUNNING):
            assert time.monotonic() < deadline, "the held query was not given back to the queue"
            time.sleep(0.3)
        # Given back by a sweeper (the rescuer's, or another stack's of this session: one deployment),
        # long before the broker's visibility timeout would have.
        assert query.status == Query.Status.SUCCEEDED and query.worker.startswith("rescuer-")
    finally:
        stack.stop()


def test_a_row_its_web_process_never_dispatched_is_dispatched_by_the_sweeper(tenant, tmp_path, settings):
    """A web process that dies between committing a query's row and sending its message leaves a
    queued row and no message. This process is that web process (it writes the row, sends nothing);
    a worker's sweeper dispatches it once it is UNDISPATCHED_QUEUED_SECONDS old, and it runs."""
    from accounts import quotas
    from inference import services
    from tests.stack import SESSION_PREFIX

    key_row, _ = accounts.create_api_key(tenant, "orphaned")
    stack = Stack(tmp_path, UNDISPATCHED_QUEUED_SECONDS="1")
    # Redis has lost nothing here: say so, as a running deployment's sweeper has, or the worker would
    # dispatch every queued query again as after a Redis restart.
    settings.REDIS_URL, settings.REDIS_KEY_PREFIX, settings.EMBEDDED = stack.redis_url, SESSION_PREFIX, False
    quotas.backend().mark_restored(quotas.now())
    data = services.check_input(prompt="orphan", images=[media.png(20, 10)], max_tokens=8)
    query = services.accept(key_row, data, endpoint=Query.Endpoint.QUERIES)
    stack.start_web()
    stack.start_worker("sweeping")
    try:
        deadline = time.monotonic() + 90
        while (query := Query.objects.get(pk=query.pk)).status in (Query.Status.QUEUED, Query.Status.RUNNING):
            assert time.monotonic() < deadline, "the undispatched row was never dispatched"
            time.sleep(0.3)
        assert query.status == Query.Status.SUCCEEDED, (query.error_code, query.error_message)
        assert query.worker.startswith("sweeping-")
        assert "'dispatched_again': 1" in stack.log("sweeping")
    finally:
        stack.stop()


def test_sweeper_ends_never_taken_queries_from_the_command_one_sweeper_at_a_time(tenant, tmp_path, settings):
    """End to end: no worker on the queue and MAX_QUEUED_SECONDS of 1 s. While another sweeper holds
    the Redis lock, a worker's sweeper skips its turn; `manage.py sweep_queries` ends the query
    failed/worker_lost and gives its slot back."""
    import sys

    from inference import workers
    from tests.conftest import REPO

    _, key = accounts.create_api_key(tenant, "orphan", max_concurrent_requests=1)
    # A key prefix of its own: the session's other workers sweep under SESSION_PREFIX's lock every
    # second, which made taking that lock here a race.
    prefix = f"sweeper-lock-{uuid.uuid4().hex[:8]}"
    stack = Stack(tmp_path, MAX_QUEUED_SECONDS="1", REDIS_KEY_PREFIX=prefix)
    stack.start_web()
    try:
        stack.wait_web()
        status, body = post_json(stack.url + "/v1/queries", {"image": _image_b64(), "prompt": "x"}, key)
        assert status == 202, body
        time.sleep(1.5)  # older than MAX_QUEUED_SECONDS now

        # This process as a worker's sweeper, on the stack's Redis and settings.
        settings.REDIS_URL, settings.REDIS_KEY_PREFIX, settings.MAX_QUEUED_SECONDS = stack.redis_url, prefix, 1
        settings.EMBEDDED = False  # its quota counters too: the stack's, in Redis
        held = workers.client().lock(f"{prefix}:sweeper", timeout=60)
        assert held.acquire(blocking=True, blocking_timeout=10)  # another sweeper is running
        try:
            assert workers.sweep_with_lock() is None
            assert Query.objects.get(pk=body["id"]).status == Query.Status.QUEUED
        finally:
            held.release()

        swept = subprocess.run(
            [sys.executable, "manage.py", "sweep_queries"],
            cwd=REPO,
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert swept.returncode == 0, swept.stderr
        assert "ended 0 running on dead workers, 1 never taken" in swept.stdout
        query = Query.objects.get(pk=body["id"])
        assert (query.status, query.error_code) == (Query.Status.FAILED, "worker_lost")
        assert query.error_message == "No worker took this query within 1 s."
        usage = get_json(stack.url + "/v1/usage", key)[1]["key"]["quotas"]
        assert usage["concurrent_requests"]["used"] == 0 and usage["tokens_per_month"]["used"] == 0
        ran = workers.sweep_with_lock()  # the lock is free now: it runs, and finds nothing left to end
        assert ran is not None and (ran["worker_lost"], ran["never_taken"], ran["settled_late"]) == (0, 0, 0), ran
    finally:
        stack.stop()


def test_ready_is_503_when_redis_is_down(settings, api_client, tmp_path):
    from inference.dispatch import get_dispatcher

    get_dispatcher().wait_loaded(120)
    port = free_port()
    redis = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            response = api_client.get("/health/ready")
            if response.json()["redis"]:
                break
            time.sleep(0.1)
        assert response.status_code == 200, response.json()
        assert response.json()["database"] is True
    finally:
        redis.terminate()
        redis.wait(timeout=10)
    response = api_client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["redis"] is False and response.json()["status"] == "unavailable"


def test_sweeper_fails_queries_of_dead_workers(tenant, api_key, settings):
    from datetime import timedelta

    from django.utils import timezone

    from inference import services, workers
    from tests.stack import REDIS_TEST_DB, redis_base_url, session_sweepers_kept_off

    # The sweeper re-reads a worker's heartbeat in Redis before failing its query: a Redis of its own.
    settings.REDIS_URL = f"{redis_base_url()}/{REDIS_TEST_DB}"
    settings.REDIS_KEY_PREFIX = f"sweeper-test-{uuid.uuid4().hex[:8]}"

    with session_sweepers_kept_off():  # the live stack's worker would sweep these rows first
        data = services.check_input(prompt="x", images=[media.png(8, 8)])
        query = services.accept(api_key[0], data, endpoint=Query.Endpoint.QUERIES)
        Query.objects.filter(pk=query.pk).update(
            status=Query.Status.RUNNING, worker="ghost@nowhere", started_at=timezone.now() - timedelta(minutes=5)
        )
        alive = services.accept(api_key[0], data, endpoint=Query.Endpoint.QUERIES)
        Query.objects.filter(pk=alive.pk).update(
            status=Query.Status.RUNNING, worker="alive@here", started_at=timezone.now() - timedelta(minutes=5)
        )
        ended = workers.sweep(live_names={"alive@here"})
        assert ended["worker_lost"] == 1
        query.refresh_from_db()
        assert (
            query.status == Query.Status.FAILED
            and query.error_code == "worker_lost"
            and "ghost@nowhere" in query.error_message
        )
        assert Query.objects.get(pk=alive.pk).status == Query.Status.RUNNING
        Query.objects.filter(pk=alive.pk).delete()  # no stack's sweeper finds it after the lock


def test_websocket_from_a_foreign_web_page_is_refused(live_stack, key):
    async def connect(origin):
        async with websockets.connect(
            live_stack.ws_url + "/ws/v1/infer", origin=origin, additional_headers={"X-API-Key": key}
        ) as ws:
            return json.loads(await ws.recv())

    assert asyncio.run(connect(f"http://127.0.0.1:{live_stack.port}"))["type"] == "ready"  # this server's own origin
    with pytest.raises(websockets.InvalidStatus) as info:
        asyncio.run(connect("https://evil.example.com"))
    assert info.value.response.status_code == 403


def test_stack_teardown_kills_what_ignores_sigterm(tmp_path):
    """A process that ignores SIGTERM is killed after the grace period, and the others are stopped too."""
    import sys

    stack = Stack(tmp_path)
    stubborn = stack._spawn(
        "stubborn",
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
    )
    polite = stack._spawn("polite", [sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(0.5)  # let the first install its handler
    stack.stop(grace=1)
    assert stubborn.poll() == -9 and polite.poll() == -15
    assert stack.processes == {}
