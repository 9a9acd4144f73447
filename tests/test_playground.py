"""The playground in a real headless Chromium against the live stack (web process + Celery worker
running the tiny model): a conversation of two turns with two images, the request shown as curl and
Python run for real with a key, stop, new conversation, thinking with its reasoning apart; then the
query log and the query detail of what it asked. The model's answers are noise: the page is compared
with what the database stored. Screenshots under test-output/screenshots/, axe reports under
test-output/axe/."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
from playwright.sync_api import expect

from accounts import services
from accounts.models import ApiKey
from inference.models import Query
from tests import forcing, media
from tests import test_browser as browser
from tests.a11y import check_accessible, check_narrow

pytestmark = pytest.mark.django_db(transaction=True)

# The fixtures of tests/test_browser.py (the live stack's browser, a tenant owner).
browser_context = browser.browser_context
owner = browser.owner
from_db, sign_in, shot = browser.from_db, browser.sign_in, browser.shot
DONE = 90_000  # ms: the tiny model on a busy 2-core machine


def _picture(tmp_path, name, width, height) -> tuple[str, bytes]:
    content = media.png(width, height)
    path = tmp_path / name
    path.write_bytes(content)
    return str(path), content


def _query_ids(page) -> list[str]:
    """The ids of the queries the page's answers came from (each answer links to its query)."""
    return [link.text_content() for link in page.locator("#turns > li.assistant .turn-meta a").all()]


def _ask(page, text, *, keyboard=False):
    before = len(_query_ids(page))
    page.fill("#prompt", text)
    if keyboard:
        page.press("#prompt", "Control+Enter")
    else:
        page.click("#run")
    expect(page.locator("#turns > li.assistant .turn-meta a")).to_have_count(before + 1, timeout=DONE)
    expect(page.locator("#status")).to_have_text("Done.", timeout=DONE)
    return _query_ids(page)[-1]


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _images(query_id) -> list[str]:
    return from_db(
        lambda: list(Query.objects.get(pk=query_id).images.order_by("position").values_list("sha256", flat=True))
    )


def _new_chat_query(known: set) -> Query:
    return from_db(lambda: Query.objects.filter(endpoint=Query.Endpoint.CHAT_COMPLETIONS).exclude(pk__in=known).get())


def test_two_turns_with_two_images_then_the_same_request_as_curl_and_python(
    owner, live_stack, browser_context, tmp_path
):
    page = browser_context.new_page()
    sign_in(page, "browser-owner")
    page.goto("/dashboard/playground/")
    expect(page.locator("#model")).to_have_value("glm-4.6v-flash")
    page.uncheck("#thinking")
    page.fill("#max-tokens", "24")
    wide, wide_bytes = _picture(tmp_path, "wide.png", 96, 64)
    tall, _ = _picture(tmp_path, "tall.png", 50, 80)
    square, square_bytes = _picture(tmp_path, "square.png", 40, 40)

    # Three images picked (two, then one more), previewed; the middle one removed with the keyboard.
    page.set_input_files("#image", [wide, tall])
    page.set_input_files("#image", square)
    previews = page.locator("#previews img")
    expect(previews).to_have_count(3)
    page.focus("button[aria-label='Remove image 2 (tall.png)']")
    page.keyboard.press("Enter")
    expect(previews).to_have_count(2)
    expect(page.locator("#previews li").nth(1)).to_contain_text("Image 2 · square.png · 40×40")
    assert [previews.nth(i).get_attribute("alt") for i in range(2)] == [
        "Preview of image 1 (wide.png)",
        "Preview of image 2 (square.png)",
    ]
    assert all(previews.nth(i).evaluate("img => img.complete && img.naturalWidth > 0") for i in range(2))
    expect(page.locator("#images-left")).to_have_text("6")  # 8 per conversation, 2 taken

    first_id = _ask(page, "Compare the two pictures.")
    first = from_db(lambda: Query.objects.get(pk=first_id))
    assert first.status == Query.Status.SUCCEEDED and first.endpoint == Query.Endpoint.WEBSOCKET
    assert page.locator("#turns .answer").nth(0).text_content() == first.answer
    assert first.messages == [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two pictures."}],
        }
    ]
    assert _images(first_id) == [_sha(wide_bytes), _sha(square_bytes)]
    assert first.params["max_tokens"] == 24 and first.params["enable_thinking"] is False

    # The follow-up, sent with the keyboard: the first turn, its answer and its images go with it.
    second_id = _ask(page, "Which one is wider?", keyboard=True)
    second = from_db(lambda: Query.objects.get(pk=second_id))
    assert second.status == Query.Status.SUCCEEDED
    assert second.messages == [
        first.messages[0],
        {"role": "assistant", "content": [{"type": "text", "text": first.answer}]},
        {"role": "user", "content": [{"type": "text", "text": "Which one is wider?"}]},
    ]
    assert _images(second_id) == [_sha(wide_bytes), _sha(square_bytes)]
    assert page.locator("#turns .answer").nth(1).text_content() == second.answer
    expect(page.locator("#turns > li.user")).to_have_count(2)
    expect(page.locator("#turns > li.user").nth(0).locator("img")).to_have_count(2)  # the images in their turn
    expect(page.locator("#stats")).to_contain_text(f"{second.completion_tokens} completion tokens")
    shot(page, "playground-two-images-two-turns")
    check_accessible(page, "playground")
    check_narrow(page, "playground")

    # "Show as curl / Python": the request last sent, with a placeholder where the key goes.
    page.click("#show-code")
    expect(page.locator("#code")).to_be_visible()
    expect(page.locator("#code-which")).to_have_text("The request the page sent last.")
    curl = page.locator("#curl-code").text_content()
    python = page.locator("#python-code").text_content()
    assert "$SIGHTLINE_API_KEY" in curl and 'os.environ["SIGHTLINE_API_KEY"]' in python
    prefixes = from_db(lambda: list(ApiKey.objects.values_list("prefix", flat=True)))
    assert prefixes and not any(f"sl_{prefix}_" in curl + python for prefix in prefixes)  # no key is printed
    page.click("button[data-copy=curl-code]")
    expect(page.locator("#copy-status")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == curl
    shot(page, "playground-show-as-curl")
    check_accessible(page, "playground with the code")

    _, plaintext = from_db(lambda: services.create_api_key(first.tenant, "from the shell"))
    env = {**os.environ, "SIGHTLINE_API_KEY": plaintext}
    known = set()
    for name, command in (("curl", ["bash", "-c", curl]), ("python", [sys.executable, "-c", python])):
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, f"{name}: {run.stdout[-2000:]} {run.stderr[-2000:]}"
        replay = _new_chat_query(known)
        known.add(replay.pk)
        # the same request: the same conversation, images and decoding values as the page's
        assert replay.status == Query.Status.SUCCEEDED, (name, replay.error_code, replay.error_message)
        assert replay.messages == second.messages, name
        assert _images(replay.pk) == _images(second_id), name
        for field in ("max_tokens", "temperature", "top_p", "enable_thinking"):
            assert replay.params[field] == second.params[field], (name, field)
        if name == "curl":
            assert json.loads(run.stdout)["choices"][0]["message"]["content"] == replay.answer
        else:
            assert "answer:" in run.stdout

    # The query log finds the conversation's queries; the detail shows every image in its turn.
    page.goto("/dashboard/queries/?endpoint=websocket")
    expect(page.locator("#query-log tr[data-query]")).to_have_count(2)
    shot(page, "query-log-filtered")
    check_accessible(page, "query log")
    check_narrow(page, "query log")
    page.goto(f"/dashboard/queries/{second_id}/")
    turns = page.locator("#conversation > li")
    expect(turns).to_have_count(3)
    in_turn = turns.nth(0).locator("img")
    expect(in_turn).to_have_count(2)
    assert all(in_turn.nth(i).evaluate("img => img.complete && img.naturalWidth > 0") for i in range(2))
    assert turns.nth(1).locator(".turn-text").text_content() == first.answer
    expect(page.locator("#answer")).to_have_text(second.answer)
    expect(page.locator("#query-images figure")).to_have_count(2)
    assert page.locator("img#query-image").evaluate("img => img.naturalWidth") == 96
    shot(page, "query-detail-with-images")
    check_accessible(page, "query detail")
    check_narrow(page, "query detail")


def test_stop_cancels_the_running_answer_and_new_conversation_starts_afresh(owner, browser_context):
    page = browser_context.new_page()
    sign_in(page, "browser-owner")
    page.goto("/dashboard/playground/")
    page.uncheck("#thinking")
    page.fill("#max-tokens", "400")  # slowed: 50 ms a token, 20 s in all
    page.fill("#prompt", f"Tell me a long story. {forcing.SLOW}")
    page.click("#run")
    expect(page.locator("#status")).to_have_text("Generating…", timeout=DONE)
    expect(page.locator("#cancel")).to_be_enabled()
    page.focus("#cancel")
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_have_text("Stopped.", timeout=DONE)
    expect(page.locator("#turns .stopped")).to_be_visible()
    expect(page.locator("#cancel")).to_be_disabled()
    stopped = from_db(lambda: Query.objects.get(tenant__slug="browser-co"))
    assert stopped.status == Query.Status.FAILED and stopped.error_code == "cancelled"
    assert (stopped.completion_tokens or 0) < 400

    page.click("#new-conversation")
    expect(page.locator("#turns > li")).to_have_count(0)
    page.fill("#max-tokens", "8")
    fresh_id = _ask(page, "A new question.")
    fresh = from_db(lambda: Query.objects.get(pk=fresh_id))
    assert fresh.messages == [{"role": "user", "content": [{"type": "text", "text": "A new question."}]}]


def test_thinking_on_shows_the_reasoning_apart_from_the_answer(owner, browser_context):
    page = browser_context.new_page()
    sign_in(page, "browser-owner")
    page.goto("/dashboard/playground/")
    page.check("#thinking")
    page.fill("#max-tokens", "64")
    # forced tokens (tests/forcing.py) through the real engine: a thought, then a boxed answer
    thought_id = _ask(page, f"What colour is it? {forcing.REASONING}")
    thought = from_db(lambda: Query.objects.get(pk=thought_id))
    assert thought.params["enable_thinking"] is True
    assert thought.reasoning and thought.answer and thought.reasoning not in thought.answer
    turn = page.locator("#turns > li.assistant").last
    expect(turn.locator(".reasoning")).to_be_visible()
    assert turn.locator(".reasoning-text").text_content() == thought.reasoning
    assert turn.locator(".answer").text_content() == thought.answer
    shot(page, "playground-thinking")
    check_accessible(page, "playground with reasoning")

    page.click("#new-conversation")
    page.uncheck("#thinking")
    page.fill("#max-tokens", "8")
    plain_id = _ask(page, "No thinking, please.")
    plain = from_db(lambda: Query.objects.get(pk=plain_id))
    assert plain.params["enable_thinking"] is False and plain.reasoning == ""
    expect(page.locator("#turns > li.assistant").last.locator(".reasoning")).to_be_hidden()


def test_the_model_picker_offers_the_served_models_the_tenant_may_use(owner, client):
    client.force_login(owner)
    page = client.get("/dashboard/playground/").content.decode()
    assert '<option value="glm-4.6v-flash" selected>glm-4.6v-flash</option>' in page
    assert 'id="max-tokens" name="max_tokens" value="256" min="1" max="1024"' in page  # the model's limit
    assert 'at most <span id="max-images">8</span>' in page
    tenant = owner.memberships.get().tenant
    tenant.allowed_models = ["some-other-model"]
    tenant.save(update_fields=["allowed_models"])
    page = client.get("/dashboard/playground/").content.decode()
    assert 'id="no-models"' in page and '<option value="glm-4.6v-flash"' not in page
