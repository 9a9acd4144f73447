"""The web front against the real server process (Uvicorn, `manage.py serve`): the request-body
limit (a 100 MB upload refused without being buffered), JSON errors under /v1/, X-Request-ID, and
SIGTERM with requests in flight. The tiny model's answers are noise; nothing here reads them."""

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import websockets.sync.client
from django.conf import settings

from accounts import services as accounts
from accounts.models import Tenant
from inference.models import Query
from tests import media
from tests.stack import Stack, post_json

pytestmark = pytest.mark.django_db(transaction=True)

MB = 1024 * 1024
HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def key(tenant):
    return accounts.create_api_key(tenant, "front")[1]


def _image_b64() -> str:
    return base64.b64encode(media.encode(media.image(64, 64, seed=1), "PNG")).decode()


# --- a raw HTTP client: it sends a body while reading, as a browser or curl does ----------------
def upload(port: int, path: str, *, total: int, chunk: int = MB, content_length: bool) -> tuple[int, dict, bytes]:
    """POST ``total`` zero bytes from a generator; returns (status, headers, body) of the answer.

    With ``content_length`` the length is declared and nothing is sent until the server has had a
    chance to answer (as curl does for big bodies); without it the body is chunked and keeps coming
    until the server stops reading it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/octet-stream"]
    head.append(f"Content-Length: {total}" if content_length else "Transfer-Encoding: chunked")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    received = bytearray()

    def read():
        try:
            while data := sock.recv(65536):
                received.extend(data)
        except OSError:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    if content_length:
        time.sleep(1.0)  # an answer by Content-Length comes before any of the body
    block = b"\0" * chunk
    sent = 0
    try:
        while sent < total and not received:
            part = block if content_length else b"%x\r\n%s\r\n" % (len(block), block)
            sock.sendall(part)
            sent += chunk
        if not content_length and not received:
            sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server closed the connection after answering
    reader.join(timeout=30)
    sock.close()
    head_text, _, body = bytes(received).partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def rss_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status:
        return {
            name: int(value.split()[0])
            for name, _, value in (line.partition(":") for line in status)
            if name in ("VmRSS", "VmHWM")
        }


def test_an_upload_over_the_limit_is_refused_413_without_buffering_it(live_stack, capsys):
    # Past the limit (MAX_IMAGES_PER_REQUEST images of MAX_IMAGE_BYTES as base64, ~108 MB by default).
    total = settings.MAX_REQUEST_BYTES + 16 * MB
    pid = live_stack.processes["web"].pid
    before = rss_kib(pid)
    peak = before["VmRSS"]
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid)["VmRSS"])
            time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        # No key, streamed from a generator: chunked, so only the bytes streamed so far can tell.
        chunked = upload(live_stack.port, "/v1/glm/infer", total=total, content_length=False)
        declared = upload(live_stack.port, "/v1/glm/infer", total=total, content_length=True)
    finally:
        done.set()
        poller.join()
    after = rss_kib(pid)
    if after["VmHWM"] > before["VmHWM"]:  # the kernel's own peak, when this upload set a new one
        peak = max(peak, after["VmHWM"])
    growth = (peak - before["VmRSS"]) * 1024

    for status, headers, body in (chunked, declared):
        assert status == 413, body
        assert json.loads(body)["code"] == "payload_too_large"
        assert "MAX_REQUEST_BYTES" in json.loads(body)["msg"]
        assert HEX_ID.fullmatch(headers["x-request-id"])
    # Nothing buffered: a fixed bound far below the body (the limit itself is ~108 MB by default).
    assert growth < 48 * MB, f"the web process grew by {growth / MB:.1f} MB"
    with capsys.disabled():
        print(
            f"\n{total / MB:.0f} MB upload: web RSS {before['VmRSS'] / 1024:.0f} MB before, peak {peak / 1024:.0f} MB "
            f"(+{growth / MB:.1f} MB; limit {settings.MAX_REQUEST_BYTES / MB:.1f} MB)"
        )


def test_over_limit_bodies_get_413_in_the_endpoint_familys_shape(live_stack):
    total = settings.MAX_REQUEST_BYTES + 1
    status, _, body = upload(live_stack.port, "/v1/chat/completions", total=total, content_length=True)
    assert status == 413
    error = json.loads(body)["error"]
    assert error["code"] == "payload_too_large" and error["type"] == "invalid_request_error"
    # chunked, just over the limit, to an unknown path: refused by size before anything else
    status, _, body = upload(live_stack.port, "/v1/nowhere", total=total, chunk=256 * 1024, content_length=False)
    assert status == 413 and json.loads(body)["code"] == "payload_too_large"
    # a body at the limit passes the size check (and then needs a key)
    status, _, body = upload(live_stack.port, "/v1/glm/infer", total=1 * MB, content_length=True)
    assert status == 401 and json.loads(body)["code"] == "unauthorized"


# --- JSON errors under /v1/ ------------------------------------------------------------------
def request(url: str, *, method="GET", data: bytes | None = None, headers=None) -> tuple[int, dict, str]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def test_errors_under_v1_are_json_in_the_familys_shape(live_stack, key):
    auth = {"Authorization": f"Bearer {key}"}
    cases = [
        # (method, path, headers, body, status, code)
        ("GET", "/v1/nowhere", {}, None, 404, "not_found"),
        ("POST", "/v1/glm/infer/extra", auth, b"{}", 404, "not_found"),
        ("GET", "/v1/chat/completions/extra", auth, None, 404, "not_found"),
        # model ids may hold a slash (zai-org/GLM-4.6V-Flash): an unknown one is the model's 404
        ("GET", "/v1/models/nope/more", auth, None, 404, "model_not_found"),
        ("DELETE", "/v1/glm/infer", auth, None, 405, "method_not_allowed"),
        ("PUT", "/v1/chat/completions", auth, b"{}", 405, "method_not_allowed"),
        ("POST", "/v1/glm/infer", {**auth, "Content-Type": "multipart/form-data"}, b"xx", 400, "invalid_request"),
        (
            "POST",
            "/v1/glm/infer",
            {**auth, "Content-Type": "multipart/form-data; boundary=\u00e9".encode().decode("latin-1")},
            b"--x--",
            400,
            "invalid_request",
        ),
        ("GET", "/v1/usage", {**auth, "Host": "evil.example"}, None, 400, "invalid_request"),
        ("GET", "/v1/models", {**auth, "Host": "evil.example"}, None, 400, "invalid_request"),
    ]
    for method, path, headers, data, status, code in cases:
        got, response_headers, text = request(live_stack.url + path, method=method, data=data, headers=headers)
        assert got == status, (method, path, text)
        assert response_headers["Content-Type"].startswith("application/json"), (path, text)
        body = json.loads(text)
        openai_family = path.startswith(("/v1/chat/", "/v1/models"))
        assert (body["error"]["code"] if openai_family else body["code"]) == code, (path, body)
        message = body["error"]["message"] if openai_family else body["msg"]
        assert "object at 0x" not in message and "parse error -" not in message, message
        assert len(message) > 20, message
    # other paths keep Django's pages
    got, headers, _ = request(live_stack.url + "/nowhere")
    assert got == 404 and headers["Content-Type"].startswith("text/html")


def test_malformed_multipart_message_says_what_to_fix(live_stack, key):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "multipart/form-data"}
    status, _, text = request(live_stack.url + "/v1/glm/infer", method="POST", data=b"\0garbage", headers=headers)
    assert status == 400
    message = json.loads(text)["msg"]
    assert "boundary" in message and "Content-Disposition" in message and "parse error" not in message


# --- X-Request-ID ----------------------------------------------------------------------------
def test_request_id_is_kept_or_generated_logged_and_stored(live_stack, key):
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps({"image": _image_b64(), "prompt": "What?", "max_tokens": 4}).encode()
    status, headers, text = request(
        live_stack.url + "/v1/glm/infer", method="POST", data=body, headers={**auth, "X-Request-ID": "client.id:42-a_b"}
    )
    assert status == 200, text
    assert headers["x-request-id"] == "client.id:42-a_b"
    assert Query.objects.get(pk=json.loads(text)["query_id"]).request_id == "client.id:42-a_b"

    # an invalid id (too long, or with characters outside the set) is replaced by a fresh one
    for bad in ("x" * 129, "a b", "<script>"):
        status, headers, _ = request(live_stack.url + "/health", headers={"X-Request-ID": bad})
        assert status == 200 and HEX_ID.fullmatch(headers["x-request-id"]), headers
    ids = {request(live_stack.url + "/v1/nowhere")[1]["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(HEX_ID.fullmatch(i) for i in ids)

    # every log line of the request names it: the access line and the warning of a refusal
    request(live_stack.url + "/v1/usage", headers={"X-Request-ID": "trace-me-7"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and live_stack.log("web").count("[trace-me-7]") < 2:
        time.sleep(0.1)
    lines = [line for line in live_stack.log("web").splitlines() if "trace-me-7" in line]
    assert len(lines) >= 2 and all("[trace-me-7]" in line for line in lines), lines
    assert any('"GET /v1/usage' in line for line in lines) and any("Unauthorized" in line for line in lines)


def test_websocket_queries_store_their_connections_request_id(live_stack, key):
    with websockets.sync.client.connect(
        live_stack.ws_url + "/ws/v1/infer",
        additional_headers={"Authorization": f"Bearer {key}", "X-Request-ID": "ws-conn-1"},
        max_size=None,
    ) as ws:
        assert ws.response.headers["x-request-id"] == "ws-conn-1"
        json.loads(ws.recv(timeout=30))  # ready
        query_ids = set()
        for _ in range(2):
            ws.send(json.dumps({"type": "infer", "prompt": "Hi?", "image": _image_b64(), "max_tokens": 3}))
            while True:
                frame = json.loads(ws.recv(timeout=60))
                if frame.get("query_id"):
                    query_ids.add(frame["query_id"])
                if frame["type"] in ("done", "error"):
                    break
    assert len(query_ids) == 2
    assert {q.request_id for q in Query.objects.filter(pk__in=query_ids)} == {"ws-conn-1"}


def test_internal_error_quotes_the_requests_id():
    from config import errors, request_id

    token = request_id._current.set("abc123")
    try:
        try:
            raise RuntimeError("boom <object at 0x1>")
        except RuntimeError as exc:
            response = errors.exception_handler(exc, {})
    finally:
        request_id._current.reset(token)
    assert response.status_code == 500
    assert response.data == {
        "code": "internal_error",
        "msg": "Internal error; quote request id abc123 when reporting it.",
    }


def test_cors_exposes_request_id_rate_limit_headers_and_retry_after(client, settings):
    settings.CORS_ALLOWED_ORIGINS = ["https://app.example"]
    response = client.get("/v1/models", HTTP_ORIGIN="https://app.example")
    exposed = {h.strip().lower() for h in response["Access-Control-Expose-Headers"].split(",")}
    assert exposed >= {
        "x-request-id",
        "retry-after",
        *(f"x-ratelimit-{k}-{u}" for k in ("limit", "remaining", "reset") for u in ("requests", "tokens")),
    }


# --- SIGTERM ---------------------------------------------------------------------------------
def _read_all(port: int, method: str, path: str, body: dict, key: str) -> tuple[int | None, dict, str]:
    """One request to the end of its answer; a reset or a cut answer comes back as status None."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            method,
            path,
            body=json.dumps(body),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        response = conn.getresponse()
        return response.status, dict(response.headers), response.read().decode()  # IncompleteRead if cut
    except (OSError, http.client.HTTPException) as exc:
        return None, {}, repr(exc)
    finally:
        conn.close()


def test_sigterm_with_requests_in_flight_answers_them_and_exits_within_the_grace(tmp_path, key):
    grace = 8
    # One solo worker, busy with a long async job: the requests below wait behind it for their
    # answers (up to SYNC_TIMEOUT, far past the grace). With no worker at all they would not wait:
    # a sync request is refused at once with 503 model_unavailable.
    stack = Stack(tmp_path, SHUTDOWN_GRACE_SECONDS=str(grace), SYNC_TIMEOUT="120")
    port = stack.start_web()
    stack.start_worker("w1")
    try:
        stack.wait_ready()
        image = _image_b64()
        # A key of its own: the four requests below use all four concurrent slots of theirs.
        blocker_key = accounts.create_api_key(Tenant.objects.get(slug="acme"), "blocker")[1]
        status, blocker = post_json(
            stack.url + "/v1/queries", {"image": image, "prompt": "Go on and on.", "max_tokens": 1000}, blocker_key
        )
        assert status == 202, blocker
        deadline = time.monotonic() + 60
        while Query.objects.get(pk=blocker["id"]).status != Query.Status.RUNNING:
            assert time.monotonic() < deadline, stack.log("w1")
            time.sleep(0.1)
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Tell a long story about it."},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                ],
            }
        ]
        calls = [
            ("/v1/glm/infer", {"image": image, "prompt": "Describe it at length.", "max_tokens": 64}),
            ("/v1/glm/infer", {"image": image, "prompt": "And again.", "max_tokens": 64}),
            ("/v1/chat/completions", {"messages": messages, "max_tokens": 64}),
            ("/v1/chat/completions", {"messages": messages, "max_tokens": 64, "stream": True}),
        ]
        results: list = [None] * len(calls)

        def call(i, path, body):
            results[i] = _read_all(port, "POST", path, body, key)

        threads = [threading.Thread(target=call, args=(i, *c)) for i, c in enumerate(calls)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        waiting = Query.objects.filter(api_key__name="front").exclude(pk=blocker["id"])
        while waiting.count() < len(calls):
            assert time.monotonic() < deadline and not any(results), (results, stack.log("web"))
            time.sleep(0.1)
        time.sleep(0.5)  # the last one is waiting for its answer

        web = stack.processes.pop("web")
        started = time.monotonic()
        os.kill(web.pid, signal.SIGTERM)
        web.wait(timeout=grace + 10)
        exited_after = time.monotonic() - started
        for thread in threads:
            thread.join(timeout=10)

        assert exited_after < grace, f"exited after {exited_after:.1f} s\n{stack.log('web')}"
        for (path, body), (status, headers, text) in zip(calls, results, strict=True):
            assert status in (200, 503), (path, status, text)
            if body.get("stream"):
                assert status == 200 and text.endswith("data: [DONE]\n\n"), text
                assert '"code": "service_unavailable"' in text
            elif status == 503:
                answer = json.loads(text)
                code = answer["error"]["code"] if "error" in answer else answer["code"]
                assert code == "service_unavailable" and int(headers["Retry-After"]) > 0, answer
        # the queries go on: none was cancelled, and the worker runs each to its end
        assert not waiting.filter(status=Query.Status.FAILED).exists(), list(waiting.values("status", "error_code"))
        deadline = time.monotonic() + 180
        while Query.objects.filter(api_key__name__in=["front", "blocker"]).exclude(status="succeeded").exists():
            assert time.monotonic() < deadline, stack.log("w1")
            time.sleep(0.5)
    finally:
        stack.stop()


def test_a_burst_of_signals_still_shuts_the_server_down(tmp_path):
    """Signals in quick succession (a second Ctrl-C, SIGTERM sent to the process and passed on by a
    parent such as make) run the shutdown handler inside itself: it must not wait on a lock its
    interrupted self holds (it did: the server never exited). Each burst of SIGTERMs ends it."""
    for attempt in range(3):
        (tmp_path / str(attempt)).mkdir()
        stack = Stack(tmp_path / str(attempt), SHUTDOWN_GRACE_SECONDS="4")
        stack.start_web()
        try:
            stack.wait_web()
            process = stack.processes["web"]
            for _ in range(2000):
                try:
                    os.kill(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    break
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the server did not exit after a burst of SIGTERMs:\n{stack.log('web')}")
        finally:
            stack.stop(grace=5)
