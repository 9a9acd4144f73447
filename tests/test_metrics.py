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
        if samples.get(("sightline_workers", frozenset({("queue", live_stack.queue)}))) == 1:
            break
        assert time.monotonic() < deadline, "no live worker in /metrics within 30 s"
        time.sleep(0.3)

    def value(name, **labels):
        return samples[(name, frozenset(labels.items()))]

    queries = list(Query.objects.filter(tenant=tenant))
    assert value("sightline_requests_total", tenant="metered", outcome="succeeded") == 2
    assert value("sightline_requests_total", tenant="metered", outcome="failed") == 0
    assert value("sightline_requests_total", tenant="metered", outcome="rejected") == 1
    assert value("sightline_tokens_total", tenant="metered", kind="completion") == sum(
        q.completion_tokens for q in queries
    )
    assert value("sightline_tokens_total", tenant="metered", kind="prompt") == sum(q.prompt_tokens for q in queries)
    assert value("sightline_request_duration_seconds_count", tenant="metered") == 2
    assert value("sightline_request_duration_seconds_bucket", tenant="metered", le="+Inf") == 2
    rollup_ms = sum(row.latency_ms_total for row in UsageDaily.objects.filter(tenant=tenant))
    assert value("sightline_request_duration_seconds_sum", tenant="metered") == pytest.approx(rollup_ms / 1000)
    assert value("sightline_queue_depth", model="glm-4.6v-flash") == 0
    assert value("sightline_queries_running", model="glm-4.6v-flash") == 0
    assert value("sightline_workers", queue=live_stack.queue) == 1
    # the recent-latency quantiles are the stored timings' (one of the two queries for p99)
    totals = sorted((q.finished_at - q.created_at).total_seconds() for q in Query.objects.filter(status="succeeded"))
    assert value("sightline_recent_total_seconds", quantile="0.99") == pytest.approx(totals[-1])
    assert value("sightline_recent_first_token_seconds", quantile="0.5") > 0


def test_metrics_token(client, settings):
    assert client.get("/metrics").status_code == 200  # open when METRICS_TOKEN is unset
    settings.METRICS_TOKEN = "s3cret"
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused.json()["code"] == "unauthorized"
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    allowed = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret")
    assert allowed.status_code == 200 and b"sightline_queue_depth" in allowed.content
