"""README claims about the production stack, checked on real processes: the web server and Celery
workers of tests/stack.py, Redis, and PostgreSQL (the test database, or a cluster of its own that a
test starts and stops). The tiny model's answers are noise: only codes, rows and processes are checked."""

import asyncio
import base64
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import websockets
from django.utils import timezone

from accounts import services as accounts
from inference.models import Query
from tests import media
from tests.conftest import free_port
from tests.stack import Stack, running_stack

pytestmark = pytest.mark.django_db(transaction=True)

IMAGE = base64.b64encode(media.png(32, 32)).decode()
CHAT = {
    "model": "glm-4.6v-flash",
    "max_tokens": 4,
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + IMAGE}},
            ],
        }
    ],
}


def _key(**quota) -> str:
    slug = f"p{time.monotonic_ns()}"
    tenant = accounts.create_tenant(slug.upper(), slug=slug)
    return accounts.create_api_key(tenant, "prod", **quota)[1]


def _post(stack: Stack, path: str, key: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(stack.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


# --- a stack with no worker: lease expiry and model_unavailable --------------------------------
# The concurrent slot's lease is MAX_QUEUED_SECONDS + INFERENCE_HARD_TIME_LIMIT + 60 s
# (accounts.quotas.slot_lease_ms). Only the web process runs here, and it reads these two settings
# for nothing else (no worker, so no sweeper and no task limits), so a negative MAX_QUEUED_SECONDS
# brings the lease down to LEASE_SECONDS instead of a minute and more.
LEASE_SECONDS = 4


@pytest.fixture(scope="module")
def no_worker_stack(django_db_setup, tmp_path_factory):
    stack = Stack(
        tmp_path_factory.mktemp("no-worker"),
        MAX_QUEUED_SECONDS=str(LEASE_SECONDS - 61),
        INFERENCE_HARD_TIME_LIMIT="1",
        INFERENCE_SOFT_TIME_LIMIT="1",  # Celery wants soft <= hard
        SYNC_TIMEOUT="5",
    )
    stack.start_web()
    try:
        stack.wait_web()
        yield stack
    finally:
        stack.stop()


def test_a_concurrent_slot_nobody_frees_expires_by_itself(no_worker_stack):
    """A query that never settles (no worker takes it) holds the key's one slot until its lease ends."""
    key = _key(max_concurrent_requests=1)
    body = {"image": IMAGE, "prompt": "held", "max_tokens": 1}
    held = _post(no_worker_stack, "/v1/queries", key, body)
    assert held.status_code == 202, held.text
    admitted_at = time.monotonic()
    refused = _post(no_worker_stack, "/v1/queries", key, body)
    assert refused.status_code == 429 and refused.json()["code"] == "rate_limited", refused.text
    assert "concurrent" in refused.json()["msg"]

    def admitted():
        response = _post(no_worker_stack, "/v1/queries", key, body)
        assert response.status_code in (202, 429), response.text
        return response if response.status_code == 202 else None

    again = _wait(admitted, LEASE_SECONDS + 30, "the slot never expired")
    assert time.monotonic() - admitted_at >= LEASE_SECONDS - 0.5  # by its lease, not earlier
    # Nobody settled the first query: it is still queued, so the slot came back by expiry alone.
    assert Query.objects.get(pk=held.json()["id"]).status == Query.Status.QUEUED
    assert Query.objects.get(pk=again.json()["id"]).status == Query.Status.QUEUED


def test_no_worker_with_the_model_is_503_model_unavailable(no_worker_stack):
    """With no live worker on the model's queue, a caller that waits gets 503 model_unavailable at
    once (not a 504 after SYNC_TIMEOUT); an async job still queues for a worker to come."""
    key = _key()
    started = time.monotonic()
    response = _post(no_worker_stack, "/v1/glm/infer", key, {"image": IMAGE, "prompt": "x", "max_tokens": 1})
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["code"] == "model_unavailable" and body["query_id"], body
    assert no_worker_stack.queue in body["msg"]
    assert time.monotonic() - started < 5  # less than SYNC_TIMEOUT: it did not wait for a worker
    query = Query.objects.get(pk=body["query_id"])
    assert query.status == Query.Status.FAILED and query.error_code == "model_unavailable"
    assert query.settled_at is not None

    response = _post(no_worker_stack, "/v1/chat/completions", key, CHAT)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "model_unavailable"

    async def over_websocket():
        async with websockets.connect(
            no_worker_stack.ws_url + "/ws/v1/infer", additional_headers={"X-API-Key": key}
        ) as ws:
            frames = [json.loads(await ws.recv())]
            await ws.send(json.dumps({"type": "infer", "prompt": "x", "image": IMAGE, "max_tokens": 1}))
            while frames[-1]["type"] not in ("error", "done"):
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            return frames

    frames = asyncio.run(over_websocket())
    assert [f["type"] for f in frames] == ["ready", "queued", "error"], frames
    assert frames[-1]["code"] == "model_unavailable"

    job = _post(no_worker_stack, "/v1/queries", key, {"image": IMAGE, "prompt": "later", "max_tokens": 1})
    assert job.status_code == 202
    assert Query.objects.get(pk=job.json()["id"]).status == Query.Status.QUEUED
    usage = httpx.get(no_worker_stack.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["key"]["quotas"]["concurrent_requests"]["used"] == 1  # only the queued job holds one


# --- 504 timeout and key_expired through the production stack -----------------------------------
@pytest.fixture(scope="module")
def short_timeout_stack(django_db_setup, tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("short-timeout"), workers=("w",), SYNC_TIMEOUT="1") as stack:
        yield stack


def test_sync_timeout_is_504_with_the_query_id_and_the_query_goes_on(short_timeout_stack):
    key = _key()
    # The one solo worker is busy with a long job (1,024 tokens: seconds, even when the tiny model is
    # fast), so the sync request below waits past SYNC_TIMEOUT for certain, however fast it would run.
    blocker = _post(short_timeout_stack, "/v1/queries", _key(), {"image": IMAGE, "prompt": "on", "max_tokens": 1024})
    assert blocker.status_code == 202, blocker.text
    _wait(lambda: Query.objects.get(pk=blocker.json()["id"]).status == Query.Status.RUNNING, 60, "never ran")
    started = time.monotonic()
    response = _post(short_timeout_stack, "/v1/glm/infer", key, {"image": IMAGE, "prompt": "long", "max_tokens": 200})
    waited = time.monotonic() - started
    assert response.status_code == 504, response.text
    body = response.json()
    assert body["code"] == "timeout" and f"/v1/queries/{body['query_id']}" in body["msg"], body
    assert 1 <= waited < 30
    assert Query.objects.get(pk=body["query_id"]).status in (Query.Status.QUEUED, Query.Status.RUNNING)
    query = _wait(
        lambda: (q := Query.objects.get(pk=body["query_id"])).settled_at and q, 180, "the query never finished"
    )
    assert query.status == Query.Status.SUCCEEDED and query.completion_tokens == 200


def test_an_expired_key_is_401_key_expired(short_timeout_stack):
    slug = f"e{time.monotonic_ns()}"
    tenant = accounts.create_tenant(slug, slug=slug)
    _, key = accounts.create_api_key(tenant, "old", expires_at=timezone.now() - timedelta(minutes=1))
    response = _post(short_timeout_stack, "/v1/glm/infer", key, {"image": IMAGE, "prompt": "x", "max_tokens": 1})
    assert response.status_code == 401 and response.json()["code"] == "key_expired", response.text
    assert "expired" in response.json()["msg"] and response.headers["www-authenticate"].startswith("Bearer")
    response = _post(short_timeout_stack, "/v1/chat/completions", key, CHAT)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "key_expired"
    assert response.json()["error"]["type"] == "authentication_error"
    assert not Query.objects.filter(tenant=tenant).exists()


# --- a worker that cannot load its model ---------------------------------------------------------
def test_a_worker_that_cannot_load_its_model_says_why_and_exits(tmp_path):
    missing = tmp_path / "no-such-model"
    stack = Stack(tmp_path, INFERENCE_MODEL=str(missing))
    worker = stack.start_worker("broken")
    try:
        returncode = worker.wait(timeout=120)
    finally:
        if worker.poll() is None:  # only when it failed to exit; an exited one needs no stopping
            stack.stop()
    output = stack.log("broken")
    assert returncode != 0, output
    assert "cannot load the model" in output and str(missing) in output, output
    assert "Traceback" not in output


# --- /health/ready with PostgreSQL down ------------------------------------------------------------
class PostgresCluster:
    """A throwaway PostgreSQL cluster of this test's own (never the machine's), on a free port, in a
    temporary folder; run as the `postgres` user when the tests run as root (initdb refuses root)."""

    def __init__(self):
        self.bin = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="sightline-pg-"))
        self.data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        else:
            self.prefix = []

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.prefix, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def test_ready_is_503_with_database_false_when_postgresql_is_down(tmp_path):
    cluster = PostgresCluster()
    stack = Stack(tmp_path, database=cluster.url)
    try:
        cluster.start()
        stack.start_web()
        stack.start_worker("w")
        body = stack.wait_ready()  # 200: database, Redis and a worker with the model
        assert body["database"] is True and body["status"] == "ok"
        cluster.stop()
        started = time.monotonic()
        status, body = stack.get_json("/health/ready")
        assert status == 503, body
        assert body["database"] is False and body["status"] == "unavailable"
        assert body["redis"] is True and body["model_loaded"] is True  # only the database is missing
        assert time.monotonic() - started < 5
    finally:
        stack.stop()
        cluster.remove()
