"""The dashboard and the admin in a real headless Chromium (Debian's package, driven by Playwright
through ``executable_path``), against the live production stack (Uvicorn + Celery worker + Redis +
PostgreSQL). The model is the tiny random one: its answers are noise, so the tests compare what the
page shows with what the database stored, never with an expected sentence.

Each test saves a screenshot under test-output/screenshots/."""

import base64
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connections
from playwright.sync_api import expect, sync_playwright

from accounts import services
from accounts.models import Membership
from inference.models import Query
from tests import media
from tests.conftest import REPO
from tests.stack import post_json

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = REPO / "test-output" / "screenshots"
PASSWORD = "browser-pw-12345"

if not shutil.which(CHROMIUM):  # `make test` installs it (scripts/ensure-chromium); say so plainly
    pytest.fail(f"Chromium not found at {CHROMIUM}: run scripts/ensure-chromium", pytrace=False)


def from_db(read):
    """Run an ORM read in a thread of its own and close its connection. Playwright's sync API runs
    an event loop in the test's thread, where Django's ORM refuses to run (and where a connection
    opened anyway would be left open)."""

    def run():
        try:
            return read()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


@pytest.fixture
def browser_context(live_stack):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        context = browser.new_context(base_url=live_stack.url, viewport={"width": 1280, "height": 900})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live_stack.url)
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()
            browser.close()


@pytest.fixture
def owner(db):
    tenant = services.create_tenant("Browser Co", slug="browser-co")
    user = services.create_user("browser-owner", password=PASSWORD)
    services.add_member(tenant, user, Membership.Role.OWNER)
    return user


def sign_in(page, username, password=PASSWORD):
    page.goto("/dashboard/login/")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    expect(page.locator("header")).to_contain_text(username)


def shot(page, name, full_page=True):
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


def test_create_copy_and_use_a_key_then_find_the_query_in_the_log(owner, live_stack, browser_context):
    page = browser_context.new_page()
    sign_in(page, "browser-owner")
    page.goto("/dashboard/keys/")
    page.fill("#create-key input[name=name]", "from the browser")
    page.click("#create-key button[type=submit]")
    shown = page.locator("#new-key-value").inner_text().strip()
    assert shown.startswith("sl_")
    page.click("#copy-key")
    expect(page.locator("#copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == shown
    shot(page, "dashboard-key-created")

    # The copied key works from an ordinary HTTP client.
    status, body = post_json(
        live_stack.url + "/v1/glm/infer",
        {"image": base64.b64encode(media.png(48, 40)).decode(), "prompt": "What is in this picture?", "max_tokens": 12},
        page.evaluate("navigator.clipboard.readText()"),
    )
    assert status == 200 and body["code"] == 0, body
    query_id = body["query_id"]

    # Shown once: a reload no longer shows it.
    page.goto("/dashboard/keys/")
    expect(page.locator("#new-key-value")).to_have_count(0)
    assert shown not in page.content()

    page.goto("/dashboard/queries/")
    row = page.locator(f"a[href='/dashboard/queries/{query_id}/']")
    expect(row).to_be_visible()
    shot(page, "dashboard-query-log")

    row.click()
    stored = from_db(lambda: Query.objects.get(pk=query_id))
    expect(page.locator("#answer")).to_have_text(stored.answer)
    image = page.locator("img#query-image")
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth") == 48
    shot(page, "dashboard-query-detail")

    # The overview counts it against the quotas (from the rollups) and charts it.
    page.goto("/dashboard/")
    tokens = stored.prompt_tokens + stored.completion_tokens
    expect(page.locator(".card").first).to_contain_text(f"Today: 1 request (0 failed, 0 refused by quotas), {tokens}")
    expect(page.locator("svg.chart").first).to_be_visible()
    shot(page, "dashboard-overview")


def test_playground_streams_the_answer_over_the_websocket(owner, browser_context, tmp_path):
    page = browser_context.new_page()
    sign_in(page, "browser-owner")
    page.goto("/dashboard/playground/")
    expect(page.locator("#tiny-model-notice")).to_contain_text("random noise")
    image = tmp_path / "picture.png"
    image.write_bytes(media.png(96, 64))
    page.set_input_files("#image", str(image))
    page.fill("#prompt", "Describe the picture.")
    page.fill("#max-tokens", "160")
    # Record every text the answer box shows, to see the answer arrive in pieces.
    page.uncheck("#thinking")  # the answer itself streams (with thinking on, the noise is mostly reasoning)
    page.evaluate(
        """() => { window.seen = [];
        new MutationObserver(() => { const answer = document.querySelector("#turns .answer");
                                     if (answer) window.seen.push(answer.textContent); })
          .observe(document.getElementById("turns"), {childList: true, characterData: true, subtree: true}); }"""
    )
    page.click("#run")
    expect(page.locator("#status")).to_have_text("Done.", timeout=60_000)
    seen = [text for text in page.evaluate("window.seen") if text]
    final = page.locator("#turns .answer").text_content()
    assert len(set(seen)) > 1, f"the answer arrived in one piece: {seen}"
    assert all(final.startswith(text) for text in seen)  # pieces only ever grew the text
    stored = from_db(lambda: Query.objects.filter(tenant__slug="browser-co").get())
    assert stored.status == Query.Status.SUCCEEDED and stored.answer == final
    stats = page.locator("#stats").text_content()
    assert f"{stored.completion_tokens} completion tokens" in stats and "cost_time" in stats
    shot(page, "dashboard-playground")


@pytest.fixture
def admin_with_usage(db):
    call_command("seed_demo", queries=200, verbosity=0)
    return get_user_model().objects.create_superuser("browser-admin", password=PASSWORD)


def test_an_admin_reviews_usage_and_sees_the_charts(admin_with_usage, browser_context):
    page = browser_context.new_page()
    page.goto("/admin/login/?next=/admin/")
    page.fill("input[name=username]", "browser-admin")
    page.fill("input[name=password]", PASSWORD)
    page.click("input[type=submit]")
    page.click("#sightline-nav >> text=Usage")
    expect(page.locator("h1")).to_have_text("Usage, last 30 days")
    chart = page.locator("svg.chart").first
    expect(chart).to_be_visible()
    box = chart.bounding_box()
    assert box and box["width"] > 200 and box["height"] > 50
    bars = chart.locator("rect")
    assert bars.count() > 10
    assert max(bars.nth(i).bounding_box()["height"] for i in range(bars.count())) > 10  # drawn, not empty
    expect(page.locator("#tenants")).to_contain_text("Demo")
    # the admin's own stylesheet is served (WhiteNoise): the header has its coloured background
    assert page.locator("#header").evaluate("e => getComputedStyle(e).backgroundColor") != "rgba(0, 0, 0, 0)"
    shot(page, "admin-usage")

    page.goto("/admin/inference/query/")
    expect(page.locator("#result_list tbody tr")).to_have_count(50)  # a page of the 200 seeded
    # the date hierarchy (years, then months) and the count of the 200
    expect(page.locator("nav.toplinks a[href*='created_at__year=']")).not_to_have_count(0)
    expect(page.locator(".paginator")).to_contain_text("200 queries")
    shot(page, "admin-queries", full_page=False)
