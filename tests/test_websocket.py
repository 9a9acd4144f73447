"""``WS /ws/v1/infer`` against real processes (the web server, a Celery worker, Redis, PostgreSQL):
key state on every ``infer``, bad frames, frame sizes, the auth timeout, the per-key socket cap,
the Origin check, one query at a time per connection, and image bombs.

The tiny model's answers are noise: tests check frames, close codes and rows, never the text."""

import asyncio
import base64
import io
import json
import os
import signal
import time
import urllib.request
from datetime import timedelta

import pytest
import websockets
from django.conf import settings
from django.utils import timezone
from PIL import Image

from accounts import services as accounts
from accounts.models import ApiKey, Membership
from inference.models import Query
from tests import media
from tests.stack import Stack, running_stack

pytestmark = pytest.mark.django_db(transaction=True)

AUTH_TIMEOUT = 1.5
SOCKET_CAP = 3
SOCKET_LEASE = 3.0
WS_ENV = {
    "WS_AUTH_TIMEOUT_SECONDS": str(AUTH_TIMEOUT),
    "MAX_SOCKETS_PER_KEY": str(SOCKET_CAP),
    "WS_SOCKET_LEASE_SECONDS": str(SOCKET_LEASE),
}


@pytest.fixture(scope="module")
def stack(django_db_setup, django_db_blocker, tmp_path_factory, tiny_model_dir):
    """A web process and one Celery worker with a short auth timeout, a small socket cap and a short lease."""
    with running_stack(tmp_path_factory.mktemp("ws-stack"), **WS_ENV) as stack:
        yield stack


@pytest.fixture
def key(tenant):
    return accounts.create_api_key(tenant, "ws")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def small_image() -> str:
    return _b64(media.png(64, 48))


def noise_png(approx_bytes: int) -> bytes:
    """A PNG of random pixels (it does not compress) of about ``approx_bytes``."""
    side = int((approx_bytes / 3) ** 0.5)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def infer_frame(**fields) -> str:
    return json.dumps({"type": "infer", "prompt": "Describe it.", "image": small_image(), "max_tokens": 4, **fields})


async def connect(stack, key: str | None = None, **kwargs):
    headers = {"X-API-Key": key} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return await websockets.connect(
        stack.ws_url + "/ws/v1/infer", additional_headers=headers, max_size=None, open_timeout=10, **kwargs
    )


async def recv(ws, timeout: float = 60) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def until_end(ws, timeout: float = 120) -> list[dict]:
    """Frames up to and including ``done`` or ``error``."""
    frames = []
    while True:
        frames.append(await recv(ws, timeout))
        if frames[-1]["type"] in ("done", "error"):
            return frames


async def close_code(ws, timeout: float = 10) -> int | None:
    """The close code the server sent, once it closes (any frame left is discarded)."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None
    except TimeoutError:
        return None  # still open


def assert_clean_log(stack):
    log = stack.log("web")
    assert "Exception inside application" not in log and "Traceback" not in log, log[-3000:]


# --- item 1: key state is checked on every infer ------------------------------------------------
def _revoke(api_key):
    accounts.revoke_api_key(ApiKey.objects.get(pk=api_key.pk))  # what the admin action and the dashboard call


def _expire(api_key):
    ApiKey.objects.filter(pk=api_key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))


def _disable_tenant(api_key):
    type(api_key.tenant).objects.filter(pk=api_key.tenant_id).update(is_active=False)


@pytest.mark.parametrize(
    ("change", "code", "close"),
    [(_revoke, "key_revoked", 4401), (_expire, "key_expired", 4401), (_disable_tenant, "forbidden", 4403)],
    ids=["revoked", "expired", "tenant-disabled"],
)
def test_key_state_is_checked_on_every_infer(stack, key, change, code, close):
    api_key, plaintext = key

    async def run():
        async with await connect(stack, plaintext) as ws:
            assert (await recv(ws))["type"] == "ready"
            await ws.send(infer_frame())
            first = await until_end(ws)
            await asyncio.to_thread(change, api_key)
            await ws.send(infer_frame())
            refused = await recv(ws)
            return first, refused, await close_code(ws)

    first, refused, code_seen = asyncio.run(run())
    assert first[-1]["type"] == "done", first[-1]
    assert refused["type"] == "error" and refused["code"] == code, refused
    assert code_seen == close
    assert Query.objects.filter(api_key=api_key).count() == 1  # the refused infer wrote no row


def test_dashboard_socket_is_refused_once_the_membership_is_removed(stack, tenant):
    from django.test import Client

    user = accounts.create_user("mia", "pw-123456")
    membership = accounts.add_member(tenant, user, Membership.Role.MEMBER)
    browser = Client()
    browser.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}"

    async def run():
        async with await connect(stack, headers={"Cookie": cookie}) as ws:
            assert (await recv(ws))["type"] == "ready"
            await ws.send(infer_frame())
            first = await until_end(ws)
            await asyncio.to_thread(Membership.objects.filter(pk=membership.pk).delete)
            await ws.send(infer_frame())
            refused = await recv(ws)
            return first, refused, await close_code(ws)

    first, refused, code_seen = asyncio.run(run())
    assert first[-1]["type"] == "done", first[-1]
    assert refused["type"] == "error" and refused["code"] == "forbidden", refused
    assert code_seen == 4403
    assert Query.objects.filter(tenant=tenant).count() == 1


# --- item 6: bad frames, sizes, auth timeout, the socket cap, Origin ------------------------------
BAD_FRAMES = [
    ("not json", "not JSON"),
    ("", "not JSON"),
    ("[" * 100_000, "nested"),
    ("[1]", "object"),
    ('"x"', "object"),
    ("5", "object"),
    ("null", "object"),
    ('{"type": 5}', "type"),
    ('{"type": "infer", "prompt": "x", "max_tokens": 1e999}', "max_tokens"),
    ('{"type": "infer", "prompt": "x", "temperature": NaN}', "temperature"),
    ('{"type": "infer", "prompt": "a\\u0000b"}', "prompt"),
    ('{"type": "infer", "prompt": "\\ud800"}', "prompt"),
    ('{"type": "infer", "prompt": ["user"]}', "prompt"),
    ('{"type": "infer", "prompt": "x", "max_tokens": "many"}', "max_tokens"),
    ('{"type": "infer", "prompt": "x", "temperature": {}}', "temperature"),
]


def test_every_bad_frame_gets_an_error_frame_and_the_socket_stays_usable(stack, key):
    api_key, plaintext = key

    async def run():
        answers = []
        async with await connect(stack, plaintext) as ws:
            assert (await recv(ws))["type"] == "ready"
            for text, _ in BAD_FRAMES:
                if text.startswith('{"type": "infer"'):  # a valid image, so only the named field is wrong
                    text = text[:-1] + f', "image": "{small_image()}"}}'
                await ws.send(text)
                answers.append(await recv(ws, 30))
            await ws.send(b'{"type": "infer"}')  # a binary frame
            answers.append(await recv(ws, 30))
            await ws.send(infer_frame())
            return answers, await until_end(ws)

    answers, last = asyncio.run(run())
    for (text, named), answer in zip([*BAD_FRAMES, ("binary", "binary")], answers, strict=True):
        assert answer["type"] == "error" and answer["code"] == "invalid_request", (text[:60], answer)
        assert named.lower() in answer["message"].lower(), (text[:60], answer)
    assert last[-1]["type"] == "done", last[-1]
    assert Query.objects.filter(api_key=api_key).count() == 1
    assert_clean_log(stack)


def test_large_images_work_over_the_socket_and_an_oversize_frame_is_refused(stack, key):
    api_key, plaintext = key
    images = [noise_png(1_100_000), noise_png(9_000_000)]
    oversize = json.dumps({"type": "infer", "prompt": "x", "image": "A" * settings.MAX_WS_FRAME_BYTES})
    assert settings.MAX_WS_FRAME_BYTES < len(oversize) < 2 * settings.MAX_WS_FRAME_BYTES

    async def run():
        async with await connect(stack, plaintext) as ws:
            assert (await recv(ws))["type"] == "ready"
            ends = []
            for image in images:
                await ws.send(infer_frame(image=_b64(image)))
                ends.append((await until_end(ws))[-1])
            await ws.send(oversize)
            refused = await recv(ws)
            return ends, refused, await close_code(ws)

    ends, refused, code_seen = asyncio.run(run())
    assert all(end["type"] == "done" for end in ends), ends
    assert refused["type"] == "error" and refused["code"] == "payload_too_large", refused
    assert code_seen == 1009
    assert Query.objects.filter(api_key=api_key).count() == 2
    assert_clean_log(stack)


def test_a_socket_that_does_not_authenticate_is_closed(stack):
    async def run():
        async with await connect(stack) as ws:
            started = time.monotonic()
            frame = await recv(ws, AUTH_TIMEOUT + 10)
            code_seen = await close_code(ws)
            return frame, code_seen, time.monotonic() - started

    frame, code_seen, waited = asyncio.run(run())
    assert frame["type"] == "error" and frame["code"] == "unauthorized", frame
    assert code_seen == 4401
    assert waited >= AUTH_TIMEOUT - 0.2  # not before its time


def _wait_live(stack, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(stack.url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(stack.log("web"))


def test_open_sockets_per_key_are_capped_across_web_processes(stack, key, tmp_path):
    _, plaintext = key
    other = Stack(tmp_path, **WS_ENV)  # a second web process on the same Redis: one deployment
    other.start_web()
    try:
        _wait_live(other)

        async def opened(target):
            ws = await connect(target, plaintext)
            return ws, await recv(ws)

        async def run():
            held = [await opened(stack), await opened(other), await opened(other)]
            assert [frame["type"] for _, frame in held] == ["ready"] * SOCKET_CAP
            extra, refused = await opened(stack)
            refused_code = await close_code(extra)
            await held[0][0].close()  # closing one frees its place
            again, ready = await opened(stack)
            # A web process that dies holding sockets frees them when their lease runs out.
            await asyncio.to_thread(other.kill, "web", signal.SIGKILL)
            deadline = time.monotonic() + SOCKET_LEASE * 4
            after_kill = None
            while time.monotonic() < deadline:
                probe, frame = await opened(stack)
                await probe.close()
                if frame["type"] == "ready":
                    after_kill = time.monotonic() - (deadline - SOCKET_LEASE * 4)
                    break
                await asyncio.sleep(0.5)
            await again.close()
            return refused, refused_code, ready, after_kill

        refused, refused_code, ready, after_kill = asyncio.run(run())
    finally:
        other.stop()
    assert refused["type"] == "error" and refused["code"] == "rate_limited", refused
    assert refused_code == 4429
    assert ready["type"] == "ready"
    assert after_kill is not None, "the dead process's sockets were never freed"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("http://127.0.0.1:{port}", True),
        ("http://127.0.0.1:1234", False),
        ("http://localhost:1234", False),
        ("https://127.0.0.1:{port}", False),
        ("https://evil.example.com", False),
    ],
)
def test_origin_must_match_scheme_host_and_port(stack, key, origin, allowed):
    _, plaintext = key

    async def run():
        kwargs = {"origin": origin.format(port=stack.port)} if origin else {}
        async with await connect(stack, plaintext, **kwargs) as ws:
            return await recv(ws)

    if allowed:
        assert asyncio.run(run())["type"] == "ready"
    else:
        with pytest.raises(websockets.InvalidStatus) as info:
            asyncio.run(run())
        assert info.value.response.status_code == 403


# --- issue 16: one query at a time, image bombs --------------------------------------------------
def test_one_query_at_a_time_per_connection(stack, key):
    api_key, plaintext = key

    async def run():
        async with await connect(stack, plaintext) as ws:
            assert (await recv(ws))["type"] == "ready"
            await ws.send(infer_frame(max_tokens=300))
            queued = await recv(ws)
            await ws.send(infer_frame())
            frames = await until_end(ws)
            while frames[-1]["type"] == "error" and frames[-1].get("query_id") is None:
                frames += await until_end(ws)  # the refusal of the second; then the first's end
            return queued, frames

    queued, frames = asyncio.run(run())
    assert queued["type"] == "queued"
    refusals = [f for f in frames if f["type"] == "error" and f.get("query_id") is None]
    assert len(refusals) == 1 and refusals[0]["code"] == "invalid_request", frames
    assert frames[-1]["type"] == "done" and frames[-1]["query_id"] == queued["query_id"], frames[-1]
    assert Query.objects.filter(api_key=api_key).count() == 1


def test_an_image_bomb_over_the_socket_is_refused_and_the_socket_stays_usable(stack, key):
    api_key, plaintext = key

    async def run():
        async with await connect(stack, plaintext) as ws:
            assert (await recv(ws))["type"] == "ready"
            await ws.send(infer_frame(image=_b64(media.png_bomb())))
            refused = await recv(ws)
            await ws.send(infer_frame())
            return refused, await until_end(ws)

    refused, frames = asyncio.run(run())
    assert refused["type"] == "error" and refused["code"] == "image_too_large", refused
    assert frames[-1]["type"] == "done", frames[-1]
    assert Query.objects.filter(api_key=api_key).count() == 1
    assert_clean_log(stack)


def test_the_embedded_default_caps_open_sockets_in_process(tmp_path):
    """No Redis (the one-command deployment): the count lives in the web process."""
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    env.update(SIGHTLINE_VAR_DIR=str(tmp_path / "var"), MAX_SOCKETS_PER_KEY="2", PYTHONUNBUFFERED="1")

    def manage(*args) -> str:
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, check=True
        ).stdout

    manage("migrate", "--noinput")
    manage("create_tenant", "Solo", "--slug", "solo")
    plaintext = manage("create_api_key", "solo").strip().splitlines()[-1]
    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    embedded = Stack(tmp_path)  # only for its URLs
    embedded.port = port
    try:
        _wait_live(embedded)

        async def run():
            first, second = await connect(embedded, plaintext), await connect(embedded, plaintext)
            opened = [await recv(first), await recv(second)]
            extra = await connect(embedded, plaintext)
            refused = await recv(extra)
            refused_code = await close_code(extra)
            await first.close()
            again = await connect(embedded, plaintext)
            ready = await recv(again)
            await second.close()
            await again.close()
            return opened, refused, refused_code, ready

        opened, refused, refused_code, ready = asyncio.run(run())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    assert [frame["type"] for frame in opened] == ["ready", "ready"]
    assert refused["code"] == "rate_limited" and refused_code == 4429
    assert ready["type"] == "ready"
