"""The API keys page: the examples shown with a new key run, as shown, against the live stack (curl
as a subprocess, the Python example with the openai SDK, the JavaScript one in Node); each
key's use this month and its sparkline come from the rollups; revoking asks first. The model is
the tiny random one: answers are checked for shape and against the database, never for text."""

import contextlib
import html
import io
import json
import re
import subprocess
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from playwright.sync_api import expect

from accounts import services
from accounts.models import ApiKey, Membership
from inference.models import Query, UsageDaily
from tests import media
from tests.a11y import check_accessible, check_narrow
from tests.test_browser import PASSWORD, browser_context, from_db, shot, sign_in  # noqa: F401 - fixtures

EXAMPLES = ("curl", "python", "javascript")


@pytest.fixture
def world(db):
    tenant = services.create_tenant("Keys Co", slug="keys-co")
    other = services.create_tenant("Other Co", slug="other-co")
    people = {}
    for name, role, where in (
        ("keys-owner", Membership.Role.OWNER, tenant),
        ("keys-member", Membership.Role.MEMBER, tenant),
        ("keys-outsider", Membership.Role.OWNER, other),
    ):
        people[name] = services.create_user(name, password=PASSWORD)
        services.add_member(where, people[name], role)
    key, plaintext = services.create_api_key(tenant, "first key")
    return {"tenant": tenant, "key": key, "plaintext": plaintext, **people}


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _examples(page: str) -> dict[str, str]:
    """Each example's text exactly as the page shows it."""
    return {
        name: html.unescape(
            re.search(rf'<pre class="example" id="example-{name}"[^>]*><code>(.*?)</code></pre>', page, re.S).group(1)
        )
        for name in EXAMPLES
    }


@pytest.mark.django_db
def test_revoke_asks_first_and_only_managers_of_the_tenant_may(world):
    url = f"/dashboard/keys/{world['key'].pk}/revoke/"
    assert Client().get(url)["Location"].startswith("/dashboard/login/")
    assert _client(world["keys-member"]).get(url).status_code == 403
    assert _client(world["keys-member"]).post(url).status_code == 403
    assert _client(world["keys-outsider"]).get(url).status_code == 404
    assert _client(world["keys-outsider"]).post(url).status_code == 404
    owner = _client(world["keys-owner"])
    page = owner.get(url)
    assert page.status_code == 200
    text = page.content.decode()
    assert "Revoke first key? Requests with it fail from now on" in text and 'id="confirm-revoke"' in text
    assert ApiKey.objects.get(pk=world["key"].pk).revoked_at is None  # looking revokes nothing
    # the list links to the page (no JS-only confirm)
    assert f'href="{url}"' in owner.get("/dashboard/keys/").content.decode()
    done = owner.post(url, follow=True)
    assert done.status_code == 200 and "Revoked first key" in done.content.decode()
    assert ApiKey.objects.get(pk=world["key"].pk).revoked_at is not None
    response = Client().get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {world['plaintext']}")
    assert response.status_code == 401 and response.json()["error"]["code"] == "key_revoked"


@pytest.mark.django_db
def test_each_key_shows_last_use_and_this_months_use_from_the_rollups(world):
    key, tenant = world["key"], world["tenant"]
    today = datetime.now(UTC).date()
    used = {today: (5, 100), today - timedelta(days=1): (3, 40), today - timedelta(days=40): (7, 900)}
    for day, (requests, tokens) in used.items():
        UsageDaily.objects.create(
            date=day, tenant=tenant, api_key=key, requests=requests, prompt_tokens=tokens, completion_tokens=1
        )
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=datetime(2026, 1, 2, 3, 4, tzinfo=UTC))
    month = [counts for day, counts in used.items() if day >= today.replace(day=1)]
    with CaptureQueriesContext(connection) as queries:
        page = _client(world["keys-member"]).get("/dashboard/keys/").content.decode()
    assert not [q["sql"] for q in queries if '"inference_query"' in q["sql"]]  # never the query log
    row = re.search(rf'<tr data-key="{key.pk}">(.*?)</tr>', page, re.S).group(1)
    assert '<time datetime="2026-01-02T03:04:00+00:00">' in row
    assert f'<span class="month-requests">{sum(r for r, _ in month)}</span>' in row
    assert f'<span class="month-tokens">{sum(t + 1 for _, t in month)}</span>' in row
    assert 'data-points="30"' in row and "8 requests in the last 30 days, at most 5 a day" in row


@pytest.mark.django_db(transaction=True)
def test_the_examples_shown_with_a_new_key_run_as_shown(world, live_stack, tmp_path):
    """Sign in to the live stack over HTTP, create a key, and run the curl and Python examples the
    page shows, unchanged, from a folder holding picture.png."""
    with httpx.Client(base_url=live_stack.url, timeout=60) as web:
        web.get("/dashboard/login/")
        signed_in = web.post(
            "/dashboard/login/",
            data={"username": "keys-owner", "password": PASSWORD, "csrfmiddlewaretoken": web.cookies["csrftoken"]},
        )
        assert signed_in.status_code == 302, signed_in.text
        web.get("/dashboard/keys/")
        created = web.post(
            "/dashboard/keys/", data={"name": "examples", "csrfmiddlewaretoken": web.cookies["csrftoken"]}
        )
    assert created.status_code == 201
    shown = _examples(created.text)
    key = ApiKey.objects.get(name="examples")
    plaintext = re.search(r'id="new-key-value">(sl_[A-Za-z0-9_]+)<', created.text).group(1)
    for name, code in shown.items():
        assert plaintext in code, name
    assert f"{live_stack.url}/v1/glm/infer" in shown["curl"]
    assert f'base_url="{live_stack.url}/v1"' in shown["python"]
    assert f'new WebSocket("ws://{live_stack.url.removeprefix("http://")}/ws/v1/infer")' in shown["javascript"]
    (tmp_path / "picture.png").write_bytes(media.png(64, 48))

    ran = subprocess.run(["bash", "-c", shown["curl"]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    body = json.loads(ran.stdout)
    assert body["code"] == 0 and isinstance(body["result"], str), body
    curl_query = Query.objects.get(pk=body["query_id"])
    assert curl_query.api_key_id == key.pk and curl_query.status == Query.Status.SUCCEEDED
    assert curl_query.endpoint == Query.Endpoint.GLM_INFER and curl_query.answer == body["result"]

    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.chdir(tmp_path), contextlib.redirect_stdout(printed):
        exec(compile(shown["python"], "python-example", "exec"), namespace)  # noqa: S102 - the page's own example
    response = namespace["response"]
    answer = response.choices[0].message.content
    assert isinstance(answer, str) and printed.getvalue() == answer + "\n"
    assert response.usage.completion_tokens > 0 and response.model
    python_query = Query.objects.exclude(pk=curl_query.pk).get(api_key=key)
    assert python_query.status == Query.Status.SUCCEEDED and python_query.answer == answer
    assert python_query.images.count() == 1

    # The JavaScript example in Node (its WebSocket; Node 20 has it behind a flag).
    (tmp_path / "example.js").write_text(shown["javascript"])
    node = ["node", "--experimental-websocket", "example.js"]
    ran = subprocess.run(node, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr
    ws_query = Query.objects.get(api_key=key, endpoint=Query.Endpoint.WEBSOCKET)
    assert ws_query.status == Query.Status.SUCCEEDED
    assert (
        ran.stdout.startswith(ws_query.answer + " {")
        and f"completion_tokens: {ws_query.completion_tokens}" in ran.stdout
    )


@pytest.mark.django_db(transaction=True)
def test_create_a_key_and_copy_it_and_each_example_in_the_browser(world, live_stack, browser_context):  # noqa: F811
    page = browser_context.new_page()
    sign_in(page, "keys-owner")
    page.goto("/dashboard/keys/")
    page.fill("#create-key input[name=name]", "browser examples")
    page.click("#create-key button[type=submit]")
    key = page.locator("#new-key-value").inner_text().strip()
    assert key.startswith("sl_")
    page.click("#copy-key")
    expect(page.locator("#copied")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == key
    for name in EXAMPLES:
        button = page.locator(f"#copy-{name}")
        assert button.get_attribute("aria-label").startswith("Copy the ")
        button.focus()
        page.keyboard.press("Enter")  # keyboard usable
        expect(page.locator(f"#copied-{name}")).to_have_text("Copied")
        expect(page.locator(f"#copied-{name}")).to_have_attribute("aria-live", "polite")
        copied = page.evaluate("navigator.clipboard.readText()")
        assert copied == page.locator(f"#example-{name}").inner_text().strip() and key in copied
    shot(page, "keys-created-with-examples")
    check_accessible(page, "API keys (new key and examples)")
    check_narrow(page, "API keys (new key and examples)")

    row_key = from_db(lambda: ApiKey.objects.get(name="browser examples"))
    page.goto(f"/dashboard/keys/{row_key.pk}/")
    expect(page.locator("h1")).to_contain_text("browser examples")
    shot(page, "key-detail")
    check_accessible(page, "Key detail")
    check_narrow(page, "Key detail")

    page.goto("/dashboard/keys/")
    page.locator(f"tr[data-key='{row_key.pk}'] a", has_text="Revoke").click()
    expect(page.locator("#revoke-confirm")).to_contain_text("Requests with it fail from now on")
    shot(page, "key-revoke-confirmation")
    check_accessible(page, "Revoke confirmation")
    check_narrow(page, "Revoke confirmation")
    page.locator("#confirm-revoke").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#messages")).to_contain_text("Revoked browser examples")
    assert from_db(lambda: ApiKey.objects.get(pk=row_key.pk).revoked_at) is not None
    shot(page, "keys-list-after-revoke")
    check_accessible(page, "API keys")
    check_narrow(page, "API keys")
