"""GET /metrics (Prometheus): the figures equal what the database holds, whichever process answers.

Against the live production stack (Uvicorn + a Celery worker + Redis + PostgreSQL; tiny random
model, its answers are noise), and the token check with Django's test client."""

import base64
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from accounts import services as accounts
from inference.models import Query, UsageDaily
from tests import media
from tests.stack import post_json

pytestmark = pytest.mark.django_db(transaction=True)


def _samples(text: str) -> dict:
    """{(sample name, frozenset of labels): value}"""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _get(url: str, headers=None) -> tuple[int, str, str]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_metrics_count_what_the_database_holds(live_stack):
    tenant = accounts.create_tenant("Metered", slug="metered", requests_per_minute=2)
    _, key = accounts.create_api_key(tenant, "metered")
    image = base64.b64encode(media.png(40, 30)).decode()
    statuses = [
        post_json(live_stack.url + "/v1/glm/infer", {"image": image, "prompt": "What?", "max_tokens": n}, key)[0]
        for n in (6, 9, 6)
    ]
    assert statuses == [200, 200, 429]  # the third is over 2 requests a minute

    # Workers are seen through their heartbeats (every 0.5 s here, gone after 3 s): on a loaded
    # machine one may be late, so scrape until the worker shows, within a bound.
    deadline = time.monotonic() + 30
    while True:
        status, content_type, text = _get(live_stack.url + "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        samples = _samples(text)
        workers = ("sightline_workers", frozenset({("model", "glm-4.6v-flash"), ("queue", live_stack.queue)}))
        if samples.get(workers) == 1:
            break
        assert time.monotonic() < deadline, "no live worker in /metrics within 30 s"
        time.sleep(0.3)

    def value(name, **labels):
        return samples[(name, frozenset(labels.items()))]

    # Open (no METRICS_TOKEN): totals over every tenant, no tenant label (tests/test_security.py has
    # the per-tenant series). The database may hold other tests' tenants: compare with all of it.
    assert "metered" not in text and all("tenant" not in dict(labels) for _, labels in samples)
    mine = list(Query.objects.filter(tenant=tenant))
    assert sorted(q.status for q in mine) == ["succeeded", "succeeded"]
    own_rollups = list(UsageDaily.objects.filter(tenant=tenant))
    assert sum(row.completion_tokens for row in own_rollups) == sum(q.completion_tokens for q in mine)
    assert sum(row.prompt_tokens for row in own_rollups) == sum(q.prompt_tokens for q in mine)
    assert sum(row.rejected for row in own_rollups) == 1
    rollups = list(UsageDaily.objects.all())

    def total(field):
        return sum(getattr(row, field) for row in rollups)

    for outcome in ("succeeded", "failed", "rejected"):
        assert value("sightline_requests_total", outcome=outcome) == total(outcome)
    assert value("sightline_tokens_total", kind="completion") == total("completion_tokens")
    assert value("sightline_tokens_total", kind="prompt") == total("prompt_tokens")
    assert value("sightline_request_duration_seconds_count") == total("succeeded")
    assert value("sightline_request_duration_seconds_bucket", le="+Inf") == total("succeeded")
    assert value("sightline_request_duration_seconds_sum") == pytest.approx(total("latency_ms_total") / 1000)
    assert value("sightline_queue_depth", model="glm-4.6v-flash") == 0
    assert value("sightline_queries_running", model="glm-4.6v-flash") == 0
    assert value("sightline_workers", model="glm-4.6v-flash", queue=live_stack.queue) == 1
    # the recent-latency quantiles are the stored timings' (one of the two queries for p99)
    succeeded = Query.objects.filter(status="succeeded", model="glm-4.6v-flash")
    totals = sorted((q.finished_at - q.created_at).total_seconds() for q in succeeded)
    assert value("sightline_recent_total_seconds", model="glm-4.6v-flash", quantile="0.99") == pytest.approx(totals[-1])
    assert value("sightline_recent_first_token_seconds", model="glm-4.6v-flash", quantile="0.5") > 0


def test_metrics_token(client, settings):
    assert client.get("/metrics").status_code == 200  # open when METRICS_TOKEN is unset
    settings.METRICS_TOKEN = "s3cret"
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    allowed = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret")
    assert allowed.status_code == 200 and b"sightline_queue_depth" in allowed.content


def test_live_gauges_count_queued_and_running_work_and_every_web_process_agrees(tmp_path):
    """While the one worker runs a long query and two wait behind it, both gauges show them, and a
    second web process of the same deployment reports exactly the same figures. The worker takes one
    query at a time (INFERENCE_MAX_BATCH=1, as on a GPU that holds one), so that two stay queued."""
    from tests.stack import Stack

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    stack = Stack(tmp_path / "a", INFERENCE_MAX_BATCH="1")
    second = Stack(tmp_path / "b", INFERENCE_QUEUE=stack.queue)
    second.queue = stack.queue
    stack.start_web()
    stack.start_worker("one-at-a-time")
    second.start_web()
    ids = []
    try:
        stack.wait_ready()
        second.wait_ready()
        _, key = accounts.create_api_key(accounts.create_tenant("Gauged", slug="gauged"), "gauged")
        image = base64.b64encode(media.png(40, 30)).decode()
        for n in range(3):  # long enough (1000 tokens) to be still running while we scrape
            status, body = post_json(
                stack.url + "/v1/queries", {"image": image, "prompt": f"q{n}", "max_tokens": 1000}, key
            )
            assert status == 202, body
            ids.append(body["id"])
        deadline = time.monotonic() + 60
        while not Query.objects.filter(pk__in=ids, status=Query.Status.RUNNING).exists():
            assert time.monotonic() < deadline, "no query started within 60 s"
            time.sleep(0.1)

        model = "glm-4.6v-flash"
        deadline = time.monotonic() + 30
        while True:  # a heartbeat may be late on a loaded machine: scrape the pair again, within a bound
            first = _samples(_get(stack.url + "/metrics")[2])
            other = _samples(_get(second.url + "/metrics")[2])
            workers = ("sightline_workers", frozenset({("model", model), ("queue", stack.queue)}))
            if first == other and first[workers] == 1:
                break
            assert time.monotonic() < deadline, {k: (v, other.get(k)) for k, v in first.items() if other.get(k) != v}
            time.sleep(0.3)
        assert first[("sightline_queue_depth", frozenset({("model", model)}))] == 2
        assert first[("sightline_queries_running", frozenset({("model", model)}))] == 1
        assert Query.objects.filter(pk__in=ids, status=Query.Status.QUEUED).count() == 2
    finally:
        for query_id in ids:
            post_json(stack.url + f"/v1/queries/{query_id}/cancel", {}, key)
        deadline = time.monotonic() + 60
        while Query.objects.filter(pk__in=ids, status__in=[Query.Status.QUEUED, Query.Status.RUNNING]).exists():
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        second.stop()
        stack.stop()
