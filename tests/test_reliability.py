"""Reliability against real processes: a web process killed mid-admission, a Redis restart that
loses everything, and a Redis pause. The rows in PostgreSQL are the truth; Redis is rebuilt from them."""

import ast
import base64
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime

import pytest
import redis
from django.utils import timezone
from PIL import Image

from accounts import services as accounts
from inference.models import Query, UsageDaily
from tests import media
from tests.conftest import REPO, free_port
from tests.forcing import SLOW
from tests.stack import SESSION_PREFIX, Stack, post_json, post_json_with_headers


def test_accounts_never_imports_the_inference_runtime():
    """accounts.quotas reaches Redis through config/redis.py, not through inference.workers (which
    imports inference.runner, which imports accounts.quotas: an import cycle between the apps)."""
    runtime = {"inference.workers", "inference.runner", "inference.tasks", "inference.dispatch"}
    found = []
    for path in (REPO / "accounts").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
                found += [f"{path.name}: {name}" for name in names & runtime]
            elif isinstance(node, ast.Import):
                found += [f"{path.name}: {alias.name}" for alias in node.names if alias.name in runtime]
    assert found == []


# --- helpers ------------------------------------------------------------------------------------
pytestmark = pytest.mark.django_db(transaction=True)

SMALL = base64.b64encode(media.png(32, 32)).decode()


def _slow_image() -> str:
    """A 6000x6000 PNG of one colour: ~120 KB that take the web process seconds to check."""
    return base64.b64encode(media.encode(Image.new("RGB", (6000, 6000), (10, 200, 30)), "PNG")).decode()


def _post_quietly(url, body, key):
    try:
        return post_json(url, body, key)
    except OSError:  # the web process was killed under it
        return None


def _until(condition, timeout: float, every: float = 0.1):
    """Wait (bounded) until condition() is truthy; returns its value, or None past the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    return None


def _slots(r, name) -> int:
    return r.zcount(name, int(time.time() * 1000), "+inf")


def _counter(r, name) -> int:
    return int(r.get(name) or 0)


@pytest.fixture
def session_sweepers_held():
    """The session's other stacks share this test's database but not its Redis: their workers'
    sweepers would see its running queries' workers without a heartbeat (in their Redis) and end
    them worker_lost. One deployment has one Redis; hold the session's sweeper lock meanwhile."""
    from tests.stack import REDIS_TEST_DB, SESSION_PREFIX, redis_base_url

    lock = redis.Redis.from_url(f"{redis_base_url()}/{REDIS_TEST_DB}").lock(f"{SESSION_PREFIX}:sweeper", timeout=900)
    assert lock.acquire(blocking=True, blocking_timeout=60)
    yield
    lock.release()


class OwnRedis:
    """A redis-server of the test's own, on a free port, that the test stops, restarts and pauses."""

    def __init__(self, directory):
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        assert _until(lambda: self._pings(client), 10), "redis-server did not start"

    @staticmethod
    def _pings(client) -> bool:
        try:
            return client.ping()
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


# --- item 2: a web process killed between admission and its row ---------------------------------
def test_key_is_usable_again_after_its_web_process_dies_mid_admission(tenant, tmp_path):
    """Two slow uploads of a key allowed 2 concurrent requests are admitted, each in a web process
    SIGKILLed before its row is written: within 60 s both slots are free and both reservations
    refunded (before the fix, every request got 429 for the slot lease, ~21 minutes, and the
    tokens were never given back)."""
    row, key = accounts.create_api_key(tenant, "slow", max_concurrent_requests=2)
    stack = Stack(tmp_path)
    r = redis.Redis.from_url(stack.redis_url)
    prefix = f"{SESSION_PREFIX}:quota:{row.pk}"
    month = f"{prefix}:month:{datetime.now(UTC):%Y-%m}"
    slow = {"image": _slow_image(), "prompt": "slow", "max_tokens": 8}
    stack.start_web()
    stack.start_worker("w")
    try:
        stack.wait_ready()
        before = _counter(r, month)
        for held in (1, 2):
            # One sync view runs at a time in a web process: one admission in flight per process.
            threading.Thread(target=_post_quietly, args=(stack.url + "/v1/queries", slow, key), daemon=True).start()
            admitted = _until(lambda n=held: _slots(r, f"{prefix}:slots") >= n, 30, 0.002)
            assert admitted, "the slow upload was not admitted"
            stack.kill("web")
            killed_at = time.monotonic()
            assert not Query.objects.filter(api_key=row).exists()  # killed before its row
            stack.start_web()
            stack.wait_ready()
        assert _counter(r, month) > before  # two reservations held by no row
        status, body = post_json(stack.url + "/v1/queries", {"image": SMALL, "prompt": "x", "max_tokens": 1}, key)
        assert status == 429 and "concurrent" in body["msg"]  # the leak is real

        refunded = _until(lambda: _counter(r, month) == before, 60, 0.25)
        refunded_after = time.monotonic() - killed_at

        def admitted_again():
            status, _ = post_json(stack.url + "/v1/queries", {"image": SMALL, "prompt": "y", "max_tokens": 1}, key)
            return status == 202

        usable = _until(admitted_again, 60 - (time.monotonic() - killed_at), 0.5)
        usable_after = time.monotonic() - killed_at
        print(f"\nkey usable again {usable_after:.1f} s after the kill; tokens refunded after {refunded_after:.1f} s")
        assert refunded, f"month counter {_counter(r, month)}, {before} before the requests"
        assert usable, "the key still got 429 60 s after its web process died"
    finally:
        stack.stop()


def _wait_finished(ids, timeout: float) -> list[Query]:
    done = _until(
        lambda: not Query.objects.filter(pk__in=ids, status__in=[Query.Status.QUEUED, Query.Status.RUNNING]).exists(),
        timeout,
        0.5,
    )
    rows = list(Query.objects.filter(pk__in=ids))
    assert done, sorted((str(q.pk), q.status) for q in rows)
    return rows


# --- item 7: Redis restarted empty ---------------------------------------------------------------
def test_redis_restart_strands_no_queued_query_and_keeps_quota_counts(tenant, tmp_path, session_sweepers_held):
    """N async queries, Redis stopped while the first runs and restarted empty: every query ends
    succeeded (run once), and the key's day and month counters equal what PostgreSQL says.

    The worker runs supervised, as production runs it (README, Production): Celery can still die
    on a broker loss (kombu restoring unacknowledged messages on a closed transport:
    AttributeError 'hostname'), and then the restarted worker's sweeper dispatches the queries."""
    own = OwnRedis(tmp_path)
    own.start()
    row, key = accounts.create_api_key(tenant, "restart", max_concurrent_requests=100)
    # One query at a time (INFERENCE_MAX_BATCH=1): the others wait in Redis behind the first, which
    # is what a restart could strand. (A batch's queries all run at once; a worker that dies with
    # Redis ends them worker_lost, as any worker death does.)
    stack = Stack(tmp_path, REDIS_URL=own.url, INFERENCE_MAX_BATCH="1")
    stack.start_web()
    stack.start_worker("w")
    stack.supervise("w")
    try:
        stack.wait_ready()
        ids = []
        for i in range(8):
            # The first is long, so that it is still running when Redis stops and the others still
            # queued behind it (with 16 tokens it could end before it was ever seen running).
            body = {"image": SMALL, "prompt": f"q{i}", "max_tokens": 400 if i == 0 else 16}
            status, answer = post_json(stack.url + "/v1/queries", body, key)
            assert status == 202, answer
            ids.append(answer["id"])
        assert _until(lambda: Query.objects.filter(pk=ids[0], started_at__isnull=False).exists(), 60, 0.05)
        own.stop()
        time.sleep(1)
        own.start()  # empty: no persistence in this test's Redis
        restarted = timezone.now()
        rows = _wait_finished(ids, 240)
        assert [q.status for q in rows] == [Query.Status.SUCCEEDED] * len(ids), [(q.status, q.error_code) for q in rows]
        # Run once: the claim (queued -> running) is the only way to run, and it sets started_at and
        # the worker exactly once; the rollup below counts each query once.
        assert all(q.worker.startswith("w-") and q.started_at for q in rows)
        later = [q.started_at for q in rows if q.started_at > restarted]
        assert later, "no query was left queued at the restart; the test proves nothing"
        first = (min(later) - restarted).total_seconds()
        last = (max(later) - restarted).total_seconds()
        print(
            f"\n{len(later)} queued queries ran again after the Redis restart: the first after {first:.1f} s,"
            f" the last after {last:.1f} s; worker restarts by the supervisor: {stack.restarts['w']}"
        )

        # A query that ended while Redis was down could not settle then; the sweeper settles it a
        # WORKER_HEARTBEAT_TTL after its end. Compare the counters once every row is settled.
        unsettled = Query.objects.filter(pk__in=ids, settled_at__isnull=True)
        assert _until(lambda: not unsettled.exists(), 30, 0.2), list(unsettled.values_list("pk", flat=True))
        r = redis.Redis.from_url(own.url)
        prefix = f"{SESSION_PREFIX}:quota:{row.pk}"
        used = sum(q.total_tokens for q in rows)

        def counted():
            day = _counter(r, f"{prefix}:day:{datetime.now(UTC):%Y-%m-%d}")
            month = _counter(r, f"{prefix}:month:{datetime.now(UTC):%Y-%m}")
            return (day, month) == (len(ids), used)

        assert _until(counted, 30, 0.2), (
            _counter(r, f"{prefix}:day:{datetime.now(UTC):%Y-%m-%d}"),
            _counter(r, f"{prefix}:month:{datetime.now(UTC):%Y-%m}"),
            len(ids),
            used,
        )
        usage = UsageDaily.objects.get(api_key=row)
        assert usage.requests == len(ids) and usage.prompt_tokens + usage.completion_tokens == used
    finally:
        stack.stop()
        own.stop()


# --- item 8: Redis paused ------------------------------------------------------------------------
def test_redis_pause_answers_503_and_fails_no_running_query(tenant, tmp_path, session_sweepers_held):
    """SIGSTOP Redis for WORKER_HEARTBEAT_TTL + 2 s while a long query runs: admissions answer 503
    service_unavailable with Retry-After (not 500), /health/ready says redis false, and after
    SIGCONT the query ends succeeded: its own worker's sweeper does not end it worker_lost."""
    own = OwnRedis(tmp_path)
    own.start()
    _, key = accounts.create_api_key(tenant, "pause")
    stack = Stack(tmp_path, REDIS_URL=own.url)
    ttl = float(stack.env["WORKER_HEARTBEAT_TTL"])
    stack.start_web()
    stack.start_worker("w")
    try:
        stack.wait_ready()
        # Slowed (tests/forcing.SLOW): 400 tokens take >= 20 s, so the query still runs at SIGCONT.
        prompt = f"long {SLOW}"
        status, job = post_json(stack.url + "/v1/queries", {"image": SMALL, "prompt": prompt, "max_tokens": 400}, key)
        assert status == 202, job
        assert _until(lambda: Query.objects.filter(pk=job["id"], status=Query.Status.RUNNING).exists(), 60, 0.05)
        time.sleep(ttl)  # running for longer than the sweeper's grace
        own.process.send_signal(signal.SIGSTOP)
        paused_at = time.monotonic()
        try:
            status, body, headers = post_json_with_headers(
                stack.url + "/v1/queries", {"image": SMALL, "prompt": "x", "max_tokens": 1}, key
            )
            ready_status, ready = stack.get_json("/health/ready")
            time.sleep(max(0.0, ttl + 2 - (time.monotonic() - paused_at)))
        finally:
            own.process.send_signal(signal.SIGCONT)
        # Still running when Redis comes back: the worker's heartbeat lapsed while it ran, and its
        # own sweeper must not end it worker_lost (the test means nothing if it had ended already).
        paused = Query.objects.get(pk=job["id"])
        assert paused.status == Query.Status.RUNNING, (paused.status, paused.error_code, paused.error_message)
        assert status == 503 and body["code"] == "service_unavailable", (status, body)
        assert int(headers["Retry-After"]) >= 1
        assert ready_status == 503 and ready["redis"] is False
        (query,) = _wait_finished([job["id"]], 300)
        assert query.status == Query.Status.SUCCEEDED, (query.error_code, query.error_message)
    finally:
        stack.stop()
        own.stop()
