"""Several processes behaving as one service: platform/cluster's topology (two web processes behind
HAProxy, two Celery workers on one queue, one PostgreSQL, one Redis), started by the script itself on
the test database and the tiny model. The tests run in this file's order: the last two take a
worker and then a web process away. The tiny model's answers are noise; nothing here reads them."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import websockets

from accounts import services as accounts
from inference.models import Query, UsageDaily
from tests.conftest import REPO, free_port
from tests.forcing import SLOW
from tests.stack import Stack, post_json

pytestmark = pytest.mark.django_db(transaction=True)

FINAL = (Query.Status.SUCCEEDED, Query.Status.FAILED)


class Cluster:
    def __init__(self, state: dict, directory: Path):
        self.state, self.dir = state, directory

    @property
    def url(self) -> str:  # the load balancer
        return self.state["url"]

    def pid(self, name: str) -> int:
        return self.state["processes"][name]["pid"]

    def web_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.state['processes'][name]['port']}"

    def log(self, name: str) -> str:
        return Path(self.state["processes"][name]["log"]).read_text()

    def exited(self, name: str) -> bool:
        """Gone, or a zombie its parent (the cluster script) has not reaped yet."""
        try:
            status = Path(f"/proc/{self.pid(name)}/status").read_text()
        except FileNotFoundError:
            return True
        return "\nState:\tZ" in status


@pytest.fixture(scope="module")
def cluster(django_db_setup, tmp_path_factory, tiny_model_dir):
    directory = tmp_path_factory.mktemp("cluster")
    # The environment of tests/stack.py's stacks: the test database, a Redis database and key prefix
    # of the session's, a queue of its own, fast heartbeats and sweeps.
    # A query whose row was committed but never dispatched (its web process died in between) is
    # dispatched by a worker's sweeper after UNDISPATCHED_QUEUED_SECONDS (30 s by default), here 3 s.
    env = Stack(directory, UNDISPATCHED_QUEUED_SECONDS="3").env
    script = subprocess.Popen(
        [sys.executable, str(REPO / "platform" / "cluster"), "--dir", str(directory), "--port", str(free_port()),
         "--grace", "60", "--ready-timeout", "120"],
        cwd=REPO, env=env, stdout=open(directory / "cluster.out", "w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    state_file = directory / "cluster.json"
    deadline = time.monotonic() + 150
    while not state_file.exists():
        if script.poll() is not None or time.monotonic() > deadline:
            script.kill()
            raise RuntimeError(f"the cluster did not start:\n{(directory / 'cluster.out').read_text()}")
        time.sleep(0.2)
    try:
        yield Cluster(json.loads(state_file.read_text()), directory)
    finally:
        script.send_signal(signal.SIGTERM)  # it stops every process it started
        try:
            script.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()


def unlimited_key(name: str, **overrides) -> tuple:
    tenant = accounts.create_tenant(
        name, requests_per_minute=None, requests_per_day=None, tokens_per_month=None, max_concurrent_requests=None
    )
    return accounts.create_api_key(tenant, name, **overrides)


def post(url: str, body: dict, key: str) -> tuple[int, dict]:
    """post_json, with a connection the server dropped as status 0."""
    try:
        return post_json(url, body, key)
    except (urllib.error.URLError, ConnectionError, OSError) as exc:
        return 0, {"error": repr(exc)}


def wait_final(rows, timeout: float = 60) -> list[Query]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not rows.exclude(status__in=FINAL).exists():
            return list(rows.all())  # fresh: the caller may have evaluated (cached) it
        time.sleep(0.2)
    raise AssertionError([(q.pk, q.status, q.worker) for q in rows.exclude(status__in=FINAL)])


def max_overlap(intervals) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_quotas_are_exact_across_both_web_processes(cluster):
    # 10 requests a minute: 50 at once, alternating between the two web processes, admit exactly 10.
    row, key = unlimited_key("Per minute", requests_per_minute=10)
    urls = [cluster.web_url("web1"), cluster.web_url("web2")]
    with ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(lambda i: post(urls[i % 2] + "/v1/queries", {"prompt": f"q{i}", "max_tokens": 1}, key), range(50))
        )
    assert Counter(status for status, _ in results) == {202: 10, 429: 40}, results
    assert Query.objects.filter(api_key=row).count() == 10

    # 2 concurrent requests: 30 slow ones, 8 at a time over both processes; never more than 2 held.
    row, key = unlimited_key("Two at once", max_concurrent_requests=2)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda i: post(urls[i % 2] + "/v1/glm/infer", {"prompt": f"{SLOW} c{i}", "max_tokens": 6}, key),
                range(30),
            )
        )
    statuses = Counter(status for status, _ in results)
    assert set(statuses) == {200, 429} and statuses[200] >= 2, results
    rows = wait_final(Query.objects.filter(api_key=row))
    assert len(rows) == statuses[200]
    # A row lives within its admission's slot (created after admission, finished before release).
    assert max_overlap([(q.created_at, q.finished_at) for q in rows]) <= 2


async def _stream(ws_url: str, key: str, prompt: str) -> list[dict]:
    async with websockets.connect(ws_url + "/ws/v1/infer", additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        frames = [json.loads(await ws.recv())]  # ready
        await ws.send(json.dumps({"type": "infer", "prompt": prompt, "max_tokens": 16}))
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        return frames


def test_a_websocket_on_one_web_process_gets_every_token_from_either_worker(cluster):
    _, key = unlimited_key("Sockets")
    ws_url = cluster.web_url("web1").replace("http://", "ws://")
    workers = set()
    for i in range(40):  # until each worker has run at least one (Redis hands tasks to both)
        frames = asyncio.run(_stream(ws_url, key, f"socket {i}"))
        assert frames[-1]["type"] == "done", frames
        query = Query.objects.get(pk=frames[1]["query_id"])
        text = "".join(f["text"] for f in frames if f["type"] == "token")
        assert text == frames[-1]["result"] == query.answer
        assert frames[-1]["usage"]["completion_tokens"] == query.completion_tokens
        workers.add(query.worker.split("@")[0])
        if len(workers) == 2:
            break
    assert workers == {"cluster-worker1", "cluster-worker2"}


def test_200_requests_at_concurrency_32_through_the_load_balancer(cluster):
    row, key = unlimited_key("Load")
    with ThreadPoolExecutor(32) as pool:
        results = list(
            pool.map(
                lambda i: post(cluster.url + "/v1/glm/infer", {"prompt": f"load {i}", "max_tokens": 4}, key), range(200)
            )
        )
    accepted = [body["query_id"] for status, body in results if "query_id" in body]
    assert Counter(status for status, _ in results) == {200: 200}, Counter(status for status, _ in results)
    assert len(set(accepted)) == len(accepted) == 200
    rows = wait_final(Query.objects.filter(api_key=row))
    assert sorted(str(q.pk) for q in rows) == sorted(accepted)  # exactly one row per accepted request
    assert all(q.status == Query.Status.SUCCEEDED for q in rows)
    # The key's daily rollups, settled from each outcome, equal the rows.
    wanted = {
        "requests": len(rows),
        "succeeded": len(rows),
        "failed": 0,
        "prompt_tokens": sum(q.prompt_tokens for q in rows),
        "completion_tokens": sum(q.completion_tokens for q in rows),
    }
    deadline = time.monotonic() + 30
    while True:
        days = UsageDaily.objects.filter(api_key=row)
        got = {field: sum(getattr(d, field) for d in days) for field in wanted}
        if got == wanted or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == wanted


def test_sigterm_one_worker_mid_generation_loses_nothing_and_runs_nothing_twice(cluster):
    row, key = unlimited_key("Warm shutdown")
    ids = []
    for i in range(8):  # 60 tokens at 50 ms each: 3 s of generation
        status, body = post(cluster.url + "/v1/queries", {"prompt": f"{SLOW} t{i}", "max_tokens": 60}, key)
        assert status == 202, body
        ids.append(body["id"])
    deadline = time.monotonic() + 30
    while not Query.objects.filter(
        pk__in=ids, status=Query.Status.RUNNING, worker__startswith="cluster-worker1"
    ).exists():
        assert time.monotonic() < deadline, "worker1 took none of the queries"
        time.sleep(0.05)
    held = set(
        str(pk)
        for pk in Query.objects.filter(
            pk__in=ids, status=Query.Status.RUNNING, worker__startswith="cluster-worker1"
        ).values_list("pk", flat=True)
    )
    os.kill(cluster.pid("worker1"), signal.SIGTERM)
    rows = {str(q.pk): q for q in wait_final(Query.objects.filter(pk__in=ids), timeout=90)}
    deadline = time.monotonic() + 60
    while not cluster.exited("worker1"):
        assert time.monotonic() < deadline, "worker1 did not exit after its warm shutdown"
        time.sleep(0.2)
    # None lost: every query succeeded, whole (its 60 tokens), on one worker; those worker1 held when
    # the signal came were finished by worker1 itself.
    assert {q.status for q in rows.values()} == {Query.Status.SUCCEEDED}, [
        (q.status, q.error_code) for q in rows.values()
    ]
    assert all(q.completion_tokens == 60 for q in rows.values())
    assert all(rows[pk].worker.startswith("cluster-worker1") for pk in held)
    log = cluster.log("worker1") + cluster.log("worker2")
    assert "not running it again" not in log  # no query was delivered to be run a second time
    assert "Warm shutdown" in cluster.log("worker1")
    # The other worker carries on.
    for i in range(3):
        status, body = post(cluster.url + "/v1/glm/infer", {"prompt": f"after {i}", "max_tokens": 4}, key)
        assert status == 200, body
        assert Query.objects.get(pk=body["query_id"]).worker.startswith("cluster-worker2")


def test_sigkill_one_web_process_with_queries_in_flight(cluster):
    row, key = unlimited_key("Killed web")
    web2 = cluster.web_url("web2")
    rows = Query.objects.filter(api_key=row)
    with ThreadPoolExecutor(6) as pool:
        futures = [
            pool.submit(post, web2 + "/v1/glm/infer", {"prompt": f"{SLOW} k{i}", "max_tokens": 60}, key)
            for i in range(6)
        ]
        deadline = time.monotonic() + 30
        while rows.count() < 6 or not rows.filter(status=Query.Status.RUNNING).exists():
            assert time.monotonic() < deadline, "the requests were not admitted and started"
            time.sleep(0.05)
        os.killpg(cluster.pid("web2"), signal.SIGKILL)
        at_kill = {str(q.pk): q.status for q in rows.all()}
        answers = [future.result() for future in futures]
    assert all(status == 0 for status, _ in answers), answers  # their connections died with web2
    # Every accepted query ends, and succeeds: those dispatched run on the workers; one whose row was
    # committed but not yet dispatched when web2 died is dispatched by a worker's sweeper.
    ended = {str(q.pk): q for q in wait_final(rows, timeout=60)}
    assert len(ended) == 6
    assert [(q.status, q.error_code) for q in ended.values()] == [(Query.Status.SUCCEEDED, "")] * 6, at_kill
    # New requests go to the other process: none of them fails.
    for i in range(10):
        status, body = post(cluster.url + "/v1/glm/infer", {"prompt": f"after kill {i}", "max_tokens": 4}, key)
        assert status == 200, body
    assert Query.objects.filter(api_key=row).count() == 16
