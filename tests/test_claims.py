"""README claims that had no test, each checked end to end.

Most run twice: on the embedded default in this process (in-process counters, the worker thread)
and on the live production stack (Daphne/uvicorn + Celery worker + Redis) over real HTTP, because
the quota rules and the request path have one implementation per mode. The tiny model's answers are
noise: the tests check codes, counters, rows and shapes, never what the answer says."""

import base64
import hashlib
import http.client
import json
import math
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from django.conf import settings

from accounts import services as accounts
from inference.models import Query
from tests import media

pytestmark = pytest.mark.django_db(transaction=True)

IMAGE = base64.b64encode(media.png(32, 32)).decode()
NOT_AN_IMAGE = base64.b64encode(b"not an image").decode()  # valid base64: refused only after admission


def _tenant(**quota):
    unlimited = {
        "requests_per_minute": None,
        "requests_per_day": None,
        "tokens_per_month": None,
        "max_concurrent_requests": None,
    }
    slug = f"c{time.monotonic_ns()}"
    return accounts.create_tenant(slug.upper(), slug=slug, **{**unlimited, **quota})


def _chat_body(url: str, text: str = "What is in this picture?", **extra) -> dict:
    return {
        "model": "glm-4.6v-flash",
        "max_tokens": 4,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
        **extra,
    }


class Api:
    """One way of calling the API: in this process (embedded default) or over HTTP (live stack).
    Every call returns (status, lower-cased headers, JSON body)."""

    def __init__(self, mode: str, stack=None):
        self.mode = mode
        self.stack = stack
        if mode == "embedded":
            from rest_framework.test import APIClient

            from inference.dispatch import get_dispatcher

            assert get_dispatcher().wait_loaded(120)
            self._client = APIClient()
        else:
            self._client = httpx.Client(base_url=stack.url, timeout=120)

    def call(self, method: str, path: str, key: str, body: dict | None = None):
        headers = {"Authorization": f"Bearer {key}"}
        if self.mode == "embedded":
            kwargs = {"format": "json"} if body is not None else {}
            response = getattr(self._client, method.lower())(
                path, body, HTTP_AUTHORIZATION=headers["Authorization"], **kwargs
            )
            return response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.json()
        response = self._client.request(method, path, json=body, headers=headers)
        return response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.json()

    def post(self, path: str, key: str, body: dict | None = None):
        return self.call("POST", path, key, body if body is not None else {})

    def get(self, path: str, key: str):
        return self.call("GET", path, key)

    def usage(self, key: str) -> dict:
        status, _, body = self.get("/v1/usage", key)
        assert status == 200, body
        return body

    def close(self):
        if self.mode != "embedded":
            self._client.close()


@pytest.fixture(params=["embedded", "production"])
def api(request):
    stack = request.getfixturevalue("live_stack") if request.param == "production" else None
    client = Api(request.param, stack)
    yield client
    client.close()


def _wait_settled(query_ids, timeout=60) -> list[Query]:
    """Wait (bounded) until every query has ended and been settled (its rollup written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = list(Query.objects.filter(pk__in=query_ids))
        if len(rows) == len(query_ids) and all(q.settled_at is not None for q in rows):
            return rows
        time.sleep(0.1)
    raise AssertionError(f"not settled within {timeout} s: {[(q.pk, q.status) for q in rows]}")


# --- requests per day ---------------------------------------------------------------------------
def test_requests_per_day_admits_n_then_429_until_utc_midnight(api):
    """A key with requests_per_day=3: three admitted, the fourth 429 quota_exceeded with a Retry-After
    that runs to the next UTC midnight (not a minute, not the month)."""
    row, key = accounts.create_api_key(_tenant(requests_per_day=3), "daily")
    body = {"image": IMAGE, "prompt": "hi", "max_tokens": 1}
    answers = [api.post("/v1/queries", key, body) for _ in range(3)]
    assert [status for status, _, _ in answers] == [202, 202, 202]
    now = datetime.now(UTC)
    status, headers, refused = api.post("/v1/queries", key, body)
    assert status == 429 and refused["code"] == "quota_exceeded", refused
    assert "3 requests per day" in refused["msg"]
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    expected = math.ceil((midnight - now).total_seconds())
    assert abs(int(headers["retry-after"]) - expected) <= 5, (headers["retry-after"], expected)
    assert Query.objects.filter(api_key=row).count() == 3
    assert api.usage(key)["key"]["quotas"]["requests_per_day"] == {"limit": 3, "used": 3, "remaining": 0}
    _wait_settled([job["id"] for _, _, job in answers])  # no worker writes while the database is flushed


# --- tokens refunded after an input refused post-admission --------------------------------------
def test_input_refused_after_admission_refunds_tokens_but_counts_the_request(api):
    row, key = accounts.create_api_key(
        _tenant(tokens_per_month=100_000, requests_per_day=100, requests_per_minute=100), "refund"
    )
    status, _, done = api.post("/v1/glm/infer", key, {"image": IMAGE, "prompt": "first", "max_tokens": 3})
    assert status == 200, done
    before = api.usage(key)["key"]["quotas"]
    assert before["tokens_per_month"]["used"] == done["usage"]["total_tokens"] > 0  # a non-zero start

    status, headers, refused = api.post(
        "/v1/glm/infer", key, {"image": NOT_AN_IMAGE, "prompt": "bad", "max_tokens": 50}
    )
    assert status == 400 and refused["code"] == "invalid_image", refused
    # It was admitted (its reservation shows in the refusal's headers) before its image was refused...
    assert int(headers["x-ratelimit-remaining-tokens"]) < 100_000 - before["tokens_per_month"]["used"]

    after = api.usage(key)["key"]["quotas"]
    assert after["tokens_per_month"]["used"] == before["tokens_per_month"]["used"]  # ...and given back,
    assert after["concurrent_requests"]["used"] == 0  # with its slot,
    assert after["requests_per_day"]["used"] == before["requests_per_day"]["used"] + 1  # but it counts
    assert after["requests_per_minute"]["used"] == before["requests_per_minute"]["used"] + 1
    assert Query.objects.filter(api_key=row).count() == 1


# --- tenants are isolated: cancel and usage -----------------------------------------------------
def test_cancelling_another_tenants_query_is_404_and_leaves_it_alone(api):
    _, owner = accounts.create_api_key(_tenant(), "owner")
    _, stranger = accounts.create_api_key(_tenant(), "stranger")
    status, _, job = api.post("/v1/queries", owner, {"image": IMAGE, "prompt": "mine", "max_tokens": 16})
    assert status == 202, job
    status, _, body = api.post(f"/v1/queries/{job['id']}/cancel", stranger)
    assert status == 404 and body["code"] == "not_found", body
    (query,) = _wait_settled([job["id"]])
    assert query.status == Query.Status.SUCCEEDED, (query.status, query.error_code)  # not cancelled
    # The owner may cancel its own (already finished: nothing to stop, still 202 with its state).
    status, _, mine = api.post(f"/v1/queries/{job['id']}/cancel", owner)
    assert status == 202 and mine["id"] == job["id"] and mine["status"] == "succeeded"


def test_usage_shows_each_tenant_only_its_own(api):
    row_a, key_a = accounts.create_api_key(_tenant(), "a")
    row_b, key_b = accounts.create_api_key(_tenant(), "b")
    ids = []
    for key, n in ((key_a, 2), (key_b, 1)):
        for i in range(n):
            status, _, job = api.post("/v1/queries", key, {"image": IMAGE, "prompt": f"p{i}", "max_tokens": 2})
            assert status == 202, job
            ids.append(job["id"])
    rows = _wait_settled(ids)
    tokens = {row_a.pk: 0, row_b.pk: 0}
    for q in rows:
        tokens[q.api_key_id] += q.total_tokens
    for row, key, requests in ((row_a, key_a, 2), (row_b, key_b, 1)):
        usage = api.usage(key)
        assert usage["key"]["id"] == row.pk
        assert usage["tenant"]["slug"] == row.tenant.slug
        for scope in (usage["key"]["today"], usage["tenant"]["today"], usage["tenant"]["this_month"]):
            assert scope["requests"] == requests and scope["succeeded"] == requests, scope
            assert scope["total_tokens"] == tokens[row.pk], scope
        assert usage["key"]["quotas"]["tokens_per_month"]["used"] == tokens[row.pk]


# --- disabled tenant ----------------------------------------------------------------------------
def test_a_disabled_tenants_key_is_403_forbidden(api):
    tenant = _tenant()
    _, key = accounts.create_api_key(tenant, "k")
    assert api.get("/v1/usage", key)[0] == 200
    tenant.is_active = False
    tenant.save(update_fields=["is_active"])
    status, _, body = api.post("/v1/glm/infer", key, {"image": IMAGE, "prompt": "hi", "max_tokens": 1})
    assert status == 403 and body["code"] == "forbidden" and "disabled" in body["msg"], body
    status, _, body = api.post("/v1/chat/completions", key, _chat_body("data:image/png;base64," + IMAGE))
    assert status == 403, body
    assert body["error"]["code"] == "forbidden" and body["error"]["type"] == "permission_error"
    assert api.get("/v1/usage", key)[0] == 403
    assert not Query.objects.filter(tenant=tenant).exists()


# --- image bombs through chat completions -------------------------------------------------------
def test_image_bomb_through_chat_completions_is_413_in_openais_shape(api):
    _, key = accounts.create_api_key(_tenant(), "bomb")
    bomb = media.png_claiming(100_000, 100_000)
    assert len(bomb) < 200  # the header lies: the file is tiny
    status, _, body = api.post(
        "/v1/chat/completions", key, _chat_body("data:image/png;base64," + base64.b64encode(bomb).decode())
    )
    assert status == 413, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "image_too_large" and body["error"]["type"] == "invalid_request_error"
    # Refused from the header, before decoding; the message names the claimed size and our limit.
    assert "10,000,000,000 pixels" in body["error"]["message"]
    assert f"{settings.MAX_IMAGE_PIXELS:,} pixels" in body["error"]["message"]
    assert api.usage(key)["key"]["quotas"]["concurrent_requests"]["used"] == 0


# --- SSE ends with data: [DONE] -----------------------------------------------------------------
@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_sse_stream_ends_with_exactly_data_done(live_stack, include_usage):
    """Read the stream as raw HTTP: every event is `data: <json chunk>`, the last is exactly `data: [DONE]`."""
    _, key = accounts.create_api_key(_tenant(), "sse")
    body = _chat_body(
        "data:image/png;base64," + IMAGE, max_tokens=6, stream=True, stream_options={"include_usage": include_usage}
    )
    connection = http.client.HTTPConnection("127.0.0.1", live_stack.port, timeout=60)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(body),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/event-stream")
        raw = response.read().decode()
    finally:
        connection.close()
    assert raw.endswith("\n\n")
    events = raw[: -len("\n\n")].split("\n\n")
    assert events[-1] == "data: [DONE]", events[-3:]
    assert raw.count("[DONE]") == 1
    chunks = []
    for event in events[:-1]:
        assert event.startswith("data: {"), event
        chunks.append(json.loads(event[len("data: ") :]))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    else:
        assert chunks[-1] is finishing[0] and "usage" not in chunks[-1]


# --- gpu_oom ------------------------------------------------------------------------------------
def test_gpu_out_of_memory_is_507_gpu_oom_and_the_worker_goes_on(authed_client, api_key, monkeypatch):
    """The one fake: the model's forward raises torch.cuda.OutOfMemoryError (the engine's test hook);
    everything after it (generate, translate_error, the row, the answer) is the real path."""
    from inference.dispatch import get_dispatcher
    from inference.engine import OOM_TEST_MARKER_ENV

    assert get_dispatcher().wait_loaded(120)
    monkeypatch.setenv(OOM_TEST_MARKER_ENV, "[oom-please]")
    request = {"image": IMAGE, "prompt": "[oom-please] describe", "max_tokens": 8}
    response = authed_client.post("/v1/glm/infer", request, format="json")
    assert response.status_code == 507, response.content
    body = response.json()
    assert body["code"] == "gpu_oom" and "out of memory" in body["msg"] and body["query_id"]
    query = Query.objects.get(pk=body["query_id"])
    assert query.status == Query.Status.FAILED and query.error_code == "gpu_oom"

    response = authed_client.post(
        "/v1/chat/completions", _chat_body("data:image/png;base64," + IMAGE, "[oom-please]"), format="json"
    )
    assert response.status_code == 507
    assert response.json()["error"]["code"] == "gpu_oom" and response.json()["error"]["type"] == "server_error"

    # The next query on the same worker runs: the failure was this query's alone.
    response = authed_client.post("/v1/glm/infer", {**request, "prompt": "describe"}, format="json")
    assert response.status_code == 200, response.content
    usage = authed_client.get("/v1/usage").json()["key"]
    assert usage["quotas"]["concurrent_requests"]["used"] == 0
    assert usage["today"]["failed"] == 2 and usage["today"]["succeeded"] == 1


# --- cursor pagination --------------------------------------------------------------------------
def test_query_list_walks_every_query_once_newest_first_with_limit(api):
    _, key = accounts.create_api_key(_tenant(), "pages")
    created = []
    for i in range(7):
        status, _, job = api.post("/v1/queries", key, {"image": IMAGE, "prompt": f"q{i}", "max_tokens": 1})
        assert status == 202, job
        created.append(job["id"])
    _, other = accounts.create_api_key(_tenant(), "other")  # another tenant's query never shows
    status, _, foreign = api.post("/v1/queries", other, {"image": IMAGE, "prompt": "x", "max_tokens": 1})
    assert status == 202

    seen, sizes, url = [], [], "/v1/queries?limit=3"
    while url:
        status, _, page = api.get(url, key)
        assert status == 200, page
        sizes.append(len(page["results"]))
        seen.extend(item["id"] for item in page["results"])
        url = page["next"]
        if url and api.mode == "production":
            url = url.replace(api.stack.url, "")
        assert len(sizes) <= 10
    assert sizes == [3, 3, 1]
    assert seen == created[::-1]
    status, _, default = api.get("/v1/queries", key)
    assert len(default["results"]) == 7 and default["next"] is None
    _wait_settled([*created, foreign["id"]])  # no worker writes while the database is flushed


# --- IMAGE_URL_ALLOWED_HOSTS --------------------------------------------------------------------
@pytest.fixture
def image_server():
    """A local HTTP server in a thread serving one PNG at /x.png; it records the paths asked for."""
    png = media.png(40, 30)
    requested: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/x.png", png, requested
    finally:
        server.shutdown()
        server.server_close()


def test_image_url_is_fetched_only_from_an_allowed_host(authed_client, settings, image_server):
    from inference.dispatch import get_dispatcher

    assert get_dispatcher().wait_loaded(120)
    url, png, requested = image_server

    settings.IMAGE_URL_ALLOWED_HOSTS = ["images.example.com"]
    response = authed_client.post("/v1/chat/completions", _chat_body(url), format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "invalid_image" and "'127.0.0.1'" in error["message"]
    assert requested == []  # refused without fetching

    settings.IMAGE_URL_ALLOWED_HOSTS = ["127.0.0.1"]
    response = authed_client.post("/v1/chat/completions", _chat_body(url), format="json")
    assert response.status_code == 200, response.content
    assert requested == ["/x.png"]
    query = Query.objects.get(pk=response.json()["id"].removeprefix("chatcmpl-"))
    assert query.status == Query.Status.SUCCEEDED
    image = query.images.get()
    assert image.sha256 == hashlib.sha256(png).hexdigest()
    assert (image.width, image.height, image.position) == (40, 30, 0)
