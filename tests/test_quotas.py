"""Per-key quotas: exact under concurrency against the real Redis (through the live stack), the
same rules in the embedded default's in-process counters, and slots that always come back."""

import asyncio
import base64
import json
import math
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import websockets

from accounts import quotas
from accounts import services as accounts
from inference.models import Query, UsageDaily
from tests import media
from tests.stack import Stack, get_json, post_json

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


def _web_of(live_stack, log_dir, **env) -> Stack:
    """A second web process of the live stack's deployment (its queue, Redis, database and key
    prefix; `env` overrides settings of this process only)."""
    web = Stack(log_dir, INFERENCE_QUEUE=live_stack.queue, **env)
    web.queue = live_stack.queue
    web.start_web()
    try:
        web.wait_ready()
    except BaseException:
        web.stop()
        raise
    return web


def test_token_budget_is_never_overshot_under_concurrency(live_stack, tmp_path):
    """The budget binds on real use: a web process whose token bound is exact for this request
    (measured first) reserves what each query will really use, so the budget admits exactly
    floor(budget / use) of 24 concurrent requests, whenever the earlier ones settle."""
    body = {"image": IMAGE, "prompt": "hi", "max_tokens": 16}
    _, measure = accounts.create_api_key(_tenant(), "measure")
    status, measured = post_json(live_stack.url + "/v1/glm/infer", body, measure)
    assert status == 200, measured
    use = measured["usage"]["total_tokens"]  # the tiny model always generates exactly max_tokens
    assert measured["usage"]["completion_tokens"] == 16
    # reservation = max_tokens + prompt bytes + IMAGE_TOKEN_BOUND + TEMPLATE_TOKEN_BOUND = use
    bound = measured["usage"]["prompt_tokens"] - len(body["prompt"].encode())
    web = _web_of(live_stack, tmp_path, IMAGE_TOKEN_BOUND=str(bound), TEMPLATE_TOKEN_BOUND="0")
    try:
        budget = 5 * use + use // 2  # room for 5, and half of a sixth
        row, key = accounts.create_api_key(_tenant(tokens_per_month=budget), "budget")
        responses = asyncio.run(_burst(web.url + "/v1/glm/infer", key, 24, body))
        statuses = [r.status_code for r in responses]
        assert statuses.count(200) == 5 and statuses.count(429) == 19, statuses
        assert all(r.json()["code"] == "quota_exceeded" for r in responses if r.status_code == 429)
        rows = list(Query.objects.filter(api_key=row))
        assert len(rows) == 5 and all(q.reserved_tokens == q.total_tokens == use for q in rows)
        used = sum(q.total_tokens for q in rows)
        assert used == 5 * use <= budget
        _, usage = get_json(web.url + "/v1/usage", key)
        assert usage["key"]["quotas"]["tokens_per_month"]["used"] == used  # every reservation settled to the real count
        assert usage["key"]["this_month"]["total_tokens"] == used
        status, refused = post_json(web.url + "/v1/glm/infer", body, key)  # all settled: still no room for one more
        assert status == 429 and refused["code"] == "quota_exceeded", refused
    finally:
        web.stop()


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


def _seconds(duration: str) -> float:
    """OpenAI's reset format back to seconds: 1.5s, 6m0s, 2h3m4s."""
    import re

    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?([\d.]+)s", duration)
    assert match, duration
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds)


def _until_next_month(at: float) -> float:
    now = datetime.fromtimestamp(at, UTC)
    following = (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + timedelta(days=32)).replace(day=1)
    return (following - now).total_seconds()


def test_rate_limit_headers_count_down_and_a_429_says_when_to_retry(tenant, png_bytes, settings):
    """The exact x-ratelimit-* values, in the embedded default (in-process counters): before any
    request, after each admission, on a real 429 for requests per minute and on one for tokens."""
    from rest_framework.test import APIClient

    _, key = accounts.create_api_key(tenant, "counted", requests_per_minute=2, tokens_per_month=1000)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    body = {"image": base64.b64encode(png_bytes).decode(), "prompt": "hi", "max_tokens": 4}
    reserve = 4 + len("hi") + settings.IMAGE_TOKEN_BOUND + settings.TEMPLATE_TOKEN_BOUND  # the README's bound

    def infer():
        before = time.time()
        response = client.post("/v1/glm/infer", body, format="json")
        return response, before, time.time()

    def reset_tokens_ok(response, before, after):
        return (
            _until_next_month(after) - 1 <= _seconds(response["x-ratelimit-reset-tokens"]) <= _until_next_month(before)
        )

    before = time.time()
    idle = client.get("/v1/usage")
    assert (idle["x-ratelimit-limit-requests"], idle["x-ratelimit-remaining-requests"]) == ("2", "2")
    assert idle["x-ratelimit-reset-requests"] == "0s"  # nothing in the window
    assert (idle["x-ratelimit-limit-tokens"], idle["x-ratelimit-remaining-tokens"]) == ("1000", "1000")
    assert reset_tokens_ok(idle, before, time.time())

    first, before1, after1 = infer()
    assert first.status_code == 200, first.content
    assert first["x-ratelimit-remaining-requests"] == "1"
    assert first["x-ratelimit-reset-requests"] == "1m0s"  # the window's oldest request is this one
    assert first["x-ratelimit-remaining-tokens"] == str(1000 - reserve)  # reserved, not yet used
    assert reset_tokens_ok(first, before1, after1)
    used1 = first.json()["usage"]["total_tokens"]

    second, before2, after2 = infer()
    assert second.status_code == 200, second.content
    assert second["x-ratelimit-remaining-requests"] == "0"
    # The header shows 3 significant digits (59.96 s is "60s"): its values are exact to 0.1 s either way.
    assert before1 + 60 - after2 - 0.1 <= _seconds(second["x-ratelimit-reset-requests"]) <= after1 + 60 - before2 + 0.1
    assert second["x-ratelimit-remaining-tokens"] == str(1000 - used1 - reserve)  # the first one settled
    used2 = second.json()["usage"]["total_tokens"]

    refused, before3, after3 = infer()
    assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
    assert "2 requests per minute" in refused.json()["msg"]
    assert (refused["x-ratelimit-limit-requests"], refused["x-ratelimit-remaining-requests"]) == ("2", "0")
    window_left = (before1 + 60 - after3, after1 + 60 - before3)  # until the first request leaves the window
    assert window_left[0] - 0.1 <= _seconds(refused["x-ratelimit-reset-requests"]) <= window_left[1] + 0.1
    assert math.ceil(window_left[0]) <= int(refused["Retry-After"]) <= math.ceil(window_left[1])
    assert refused["x-ratelimit-remaining-tokens"] == str(1000 - used1 - used2)  # a refusal reserves nothing
    assert reset_tokens_ok(refused, before3, after3)

    # A budget that cannot cover the request: quota_exceeded, retry when the month turns.
    _, poor = accounts.create_api_key(tenant, "poor", tokens_per_month=reserve - 1)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {poor}")
    broke, before4, after4 = infer()
    assert broke.status_code == 429 and broke.json()["code"] == "quota_exceeded"
    assert (broke["x-ratelimit-limit-tokens"], broke["x-ratelimit-remaining-tokens"]) == (str(reserve - 1),) * 2
    assert reset_tokens_ok(broke, before4, after4)
    assert math.ceil(_until_next_month(after4)) <= int(broke["Retry-After"]) <= math.ceil(_until_next_month(before4))
    assert broke["x-ratelimit-remaining-requests"] == "60"  # the tenant's default; a refusal is not counted
