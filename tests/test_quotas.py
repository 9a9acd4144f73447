"""Per-key quotas: exact under concurrency against the real Redis (through the live stack), the
same rules in the embedded default's in-process counters, and slots that always come back."""

import asyncio
import base64
import json
import threading
import time
from datetime import UTC, datetime

import httpx
import pytest
import websockets

from accounts import quotas
from accounts import services as accounts
from inference.models import Query, UsageDaily
from tests import media
from tests.stack import get_json, post_json

pytestmark = pytest.mark.django_db(transaction=True)

IMAGE = base64.b64encode(media.png(32, 32)).decode()


def _tenant(**quota):
    defaults = {
        "requests_per_minute": None,
        "requests_per_day": None,
        "tokens_per_month": None,
        "max_concurrent_requests": None,
    }
    return accounts.create_tenant(f"T{time.monotonic_ns()}", slug=f"t{time.monotonic_ns()}", **{**defaults, **quota})


async def _burst(url: str, key: str, n: int, body: dict) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        headers = {"Authorization": f"Bearer {key}"}
        return await asyncio.gather(*(client.post(url, json=body, headers=headers) for _ in range(n)))


def test_200_concurrent_requests_at_50_per_minute_admit_exactly_50(live_stack):
    _, key = accounts.create_api_key(_tenant(requests_per_minute=50), "burst")
    responses = asyncio.run(
        _burst(live_stack.url + "/v1/queries", key, 200, {"image": IMAGE, "prompt": "hi", "max_tokens": 1})
    )
    statuses = [r.status_code for r in responses]
    assert statuses.count(202) == 50 and statuses.count(429) == 150, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.json()["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1 for r in refused)
    assert all(r.headers["x-ratelimit-limit-requests"] == "50" for r in responses)
    assert Query.objects.filter(api_key__name="burst").count() == 50
    assert UsageDaily.objects.get(api_key__name="burst").rejected == 150


def test_token_budget_is_never_overshot_under_concurrency(live_stack):
    budget = 2000
    row, key = accounts.create_api_key(_tenant(tokens_per_month=budget), "budget")
    body = {"image": IMAGE, "prompt": "hi", "max_tokens": 16}
    responses = asyncio.run(_burst(live_stack.url + "/v1/glm/infer", key, 24, body))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    assert all(r.json()["code"] == "quota_exceeded" for r in responses if r.status_code == 429)
    used = sum(q.total_tokens for q in Query.objects.filter(api_key=row))
    assert used <= budget
    _, usage = get_json(live_stack.url + "/v1/usage", key)
    assert usage["key"]["quotas"]["tokens_per_month"]["used"] == used  # every reservation settled to the real count
    assert usage["key"]["this_month"]["total_tokens"] == used


def test_concurrent_slot_is_released_after_success_failure_and_cancel(live_stack):
    row, key = accounts.create_api_key(_tenant(max_concurrent_requests=1), "one-at-a-time")
    url = live_stack.url
    # success frees the slot
    assert post_json(url + "/v1/glm/infer", {"image": IMAGE, "prompt": "a", "max_tokens": 2}, key)[0] == 200
    # a refused input (after admission) frees it
    status, body = post_json(url + "/v1/glm/infer", {"image": "bm90IGFuIGltYWdl", "prompt": "b"}, key)
    assert status == 400 and body["code"] == "invalid_image"
    # while one runs, a second is refused
    status, job = post_json(url + "/v1/queries", {"image": IMAGE, "prompt": "long", "max_tokens": 1000}, key)
    assert status == 202
    status, body = post_json(url + "/v1/glm/infer", {"image": IMAGE, "prompt": "c", "max_tokens": 2}, key)
    assert status == 429 and body["code"] == "rate_limited" and "concurrent" in body["msg"]

    # cancelling the running job ends it and frees the slot
    status, cancelled = post_json(url + f"/v1/queries/{job['id']}/cancel", {}, key)
    assert status == 202 and cancelled["id"] == job["id"]
    for _ in range(200):
        if Query.objects.get(pk=job["id"]).is_finished:
            break
        time.sleep(0.05)
    assert Query.objects.get(pk=job["id"]).error_code == "cancelled"
    for _ in range(100):  # the slot is freed just after the outcome is written
        status, _ = post_json(url + "/v1/glm/infer", {"image": IMAGE, "prompt": "d", "max_tokens": 2}, key)
        if status != 429:
            break
        time.sleep(0.05)
    assert status == 200


def test_websocket_cancel_frees_the_slot(live_stack):
    _, key = accounts.create_api_key(_tenant(max_concurrent_requests=1), "ws-one")

    async def run():
        async with websockets.connect(live_stack.ws_url + "/ws/v1/infer", additional_headers={"X-API-Key": key}) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "infer", "prompt": "x", "image": IMAGE, "max_tokens": 1000}))
            while (frame := json.loads(await ws.recv()))["type"] != "token":
                pass
            await ws.send(json.dumps({"type": "cancel"}))
            while (frame := json.loads(await ws.recv()))["type"] not in ("done", "error"):
                pass
            await ws.send(json.dumps({"type": "infer", "prompt": "y", "image": IMAGE, "max_tokens": 2}))
            frames = []
            while (frame := json.loads(await ws.recv()))["type"] not in ("done", "error"):
                frames.append(frame)
            return frame

    assert asyncio.run(run())["type"] == "done"


def test_embedded_counters_admit_exactly_the_limit_under_threads(tenant, settings):
    """The embedded default (no Redis): the same rules, exact across threads."""
    backend = quotas.LocalQuotaBackend()
    limits = quotas.Limits(
        requests_per_minute=50, requests_per_day=None, tokens_per_month=None, max_concurrent_requests=None
    )
    verdicts = []
    lock = threading.Lock()

    def hit(i):
        verdict, _ = backend.admit(1, limits, 10, f"m{i}", datetime.now(UTC))
        with lock:
            verdicts.append(verdict)

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert verdicts.count("ok") == 50 and verdicts.count("requests_per_minute") == 150


def test_embedded_token_budget_and_slots():
    backend = quotas.LocalQuotaBackend()
    limits = quotas.Limits(None, None, tokens_per_month=100, max_concurrent_requests=2)
    now = datetime.now(UTC)
    assert backend.admit(1, limits, 60, "a", now)[0] == "ok"
    assert backend.admit(1, limits, 60, "b", now)[0] == "tokens_per_month"
    backend.settle(1, "a", used=10)  # used 10 of 60
    backend.settle(1, "a", used=10)  # a repeat changes nothing
    assert backend.snapshot(1, now).tokens_this_month == 10
    assert backend.admit(1, limits, 60, "b", now)[0] == "ok"
    assert backend.admit(1, limits, 10, "c", now)[0] == "ok"
    assert backend.admit(1, limits, 10, "d", now)[0] == "max_concurrent_requests"


def test_every_answer_carries_rate_limit_headers(authed_client, png_bytes):
    """In the embedded default too (in-process counters): admitted, refused and plain GET answers."""
    for response in (
        authed_client.get("/v1/models"),
        authed_client.get("/v1/usage"),
        authed_client.post("/v1/glm/infer", {"prompt": "", "image": "AAAA"}, format="json"),
    ):
        assert response["x-ratelimit-limit-requests"] == "60", response
        assert int(response["x-ratelimit-remaining-requests"]) <= 60
        assert response["x-ratelimit-limit-tokens"] == "2000000"
        assert response["x-ratelimit-reset-tokens"]
