"""The dashboard's query log and query detail, with Django's test client: each filter, the date
range, keyset pages that keep the filters, bad input answered with a message (400, never a 500),
the detail's conversation, images, reasoning, tool calls, tokens and timings per privacy mode, and
who may see what (owner, member, someone of another tenant)."""

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts import services
from accounts.models import Membership, PrivacyMode
from inference import privacy
from inference import services as inference_services
from inference.models import Query
from tests import media

pytestmark = pytest.mark.django_db

CALL = {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def _query(api_key, *, prompt="hello", endpoint=Query.Endpoint.QUERIES, messages=None, images=1, **stored):
    pictures = [media.png(20 + k, 10) for k in range(images)]
    if messages is None:
        data = inference_services.check_input(prompt=prompt, images=pictures)
    else:
        data = inference_services.check_input(messages=messages, images=pictures)
    query = inference_services.accept(api_key, data, endpoint=endpoint)
    values = {"status": Query.Status.SUCCEEDED, "answer": f"answer to {prompt}", "prompt_tokens": 10}
    values.update(completion_tokens=5, **stored)
    Query.objects.filter(pk=query.pk).update(**values)
    query.refresh_from_db()
    return query


@pytest.fixture
def world(db):
    out = {}
    for slug in ("a", "b"):
        tenant = services.create_tenant(f"Tenant {slug.upper()}", slug=slug)
        owner = services.create_user(f"owner-{slug}", password="pw-12345678")
        member = services.create_user(f"member-{slug}", password="pw-12345678")
        services.add_member(tenant, owner, Membership.Role.OWNER)
        services.add_member(tenant, member, Membership.Role.MEMBER)
        key, _ = services.create_api_key(tenant, f"key-{slug}")
        out[slug] = {"tenant": tenant, "owner": owner, "member": member, "key": key}
    return out


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _listed(html: str) -> list[str]:
    return re.findall(r'data-query="([0-9a-f-]+)"', html)


def _get(client, params: dict | str = "", status=200) -> str:
    if isinstance(params, str):  # a link's query string, as the page wrote it
        response = client.get(f"/dashboard/queries/?{params}")
    else:
        response = client.get("/dashboard/queries/", params)
    assert response.status_code == status, response.content.decode()[:2000]
    return response.content.decode()


def test_each_filter_narrows_the_log(world):
    a = world["a"]
    other_key, _ = services.create_api_key(a["tenant"], "key-a2")
    plain = _query(a["key"], prompt="plain")
    failed = _query(a["key"], prompt="failed", status=Query.Status.FAILED, error_code="cancelled")
    chat = _query(a["key"], prompt="chat", endpoint=Query.Endpoint.CHAT_COMPLETIONS)
    by_other_key = _query(other_key, prompt="other key")
    other_model = _query(a["key"], prompt="other model", model="glm-other")
    everything = {str(q.pk) for q in (plain, failed, chat, by_other_key, other_model)}
    client = _client(a["member"])

    assert set(_listed(_get(client))) == everything
    assert _listed(_get(client, {"status": "failed"})) == [str(failed.pk)]
    assert _listed(_get(client, {"endpoint": "chat_completions"})) == [str(chat.pk)]
    assert _listed(_get(client, {"key": other_key.pk})) == [str(by_other_key.pk)]
    assert _listed(_get(client, {"model": "glm-other"})) == [str(other_model.pk)]
    assert set(_listed(_get(client, {"model": plain.model}))) == everything - {str(other_model.pk)}
    # combined: every filter applies at once
    assert _listed(_get(client, {"key": a["key"].pk, "status": "succeeded", "endpoint": "queries"})) == [
        str(other_model.pk),
        str(plain.pk),
    ]
    page = _get(client, {"status": "failed", "key": a["key"].pk})
    assert "<option selected>failed</option>" in page and f'value="{a["key"].pk}" selected' in page  # shown as chosen
    assert "No queries match these filters." in _get(client, {"status": "queued"})


def test_the_date_range_takes_whole_utc_days_both_ends_included(world):
    a = world["a"]
    at = {
        "before": datetime(2026, 2, 28, 23, 59, 59, 999999, tzinfo=UTC),
        "first moment": datetime(2026, 3, 1, 0, 0, tzinfo=UTC),
        "last moment": datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=UTC),
        "next day": datetime(2026, 3, 2, 0, 0, tzinfo=UTC),
        "later": datetime(2026, 3, 9, 12, 0, tzinfo=UTC),
    }
    ids = {name: str(_query(a["key"], prompt=name, created_at=when).pk) for name, when in at.items()}
    client = _client(a["owner"])
    assert set(_listed(_get(client, {"date_from": "2026-03-01", "date_to": "2026-03-01"}))) == {
        ids["first moment"],
        ids["last moment"],
    }
    assert set(_listed(_get(client, {"date_from": "2026-03-02"}))) == {ids["next day"], ids["later"]}
    assert set(_listed(_get(client, {"date_to": "2026-02-28"}))) == {ids["before"]}
    assert set(_listed(_get(client, {"date_from": "2026-03-01", "date_to": "2026-03-02"}))) == {
        ids["first moment"],
        ids["last moment"],
        ids["next day"],
    }
    page = _get(client, {"date_from": "2026-03-01", "date_to": "2026-03-02"})
    assert 'value="2026-03-01"' in page and 'value="2026-03-02"' in page  # the inputs keep them
    assert set(_listed(_get(client, {"date_to": "9999-12-31"}))) == set(ids.values())  # the last day there is


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"date_from": "2026-13-45"}, "From: give a date as YYYY-MM-DD"),
        ({"date_to": "yesterday"}, "To: give a date as YYYY-MM-DD"),
        ({"date_from": "2026-03-05", "date_to": "2026-03-01"}, "To: must be on or after the &#x27;From&#x27; date"),
        ({"status": "finished"}, "Status: Select a valid choice"),
        ({"endpoint": "ftp"}, "Endpoint: Select a valid choice"),
        ({"key": "abc"}, "Key: no such key in this tenant."),
        ({"before": "not a time"}, "this page link is damaged"),
        ({"before": "2026-03-01T00:00:00+00:00~not-a-uuid"}, "this page link is damaged"),
        ({"model": "m" * 201}, "Model: Ensure this value has at most 200 characters"),
    ],
)
def test_bad_filters_are_a_clear_message_not_a_500(world, params, message):
    _query(world["a"]["key"])
    page = _get(_client(world["a"]["owner"]), params, status=400)
    assert 'id="filter-errors"' in page and message in page
    assert _listed(page) == []  # nothing shown that the filters did not select
    assert "Fix the filters above to see queries." in page


def test_a_key_of_another_tenant_is_no_such_key(world):
    _query(world["b"]["key"], prompt="prompt of b")
    page = _get(_client(world["a"]["owner"]), {"key": world["b"]["key"].pk}, status=400)
    assert "Key: no such key in this tenant." in page and "prompt of b" not in page


def test_keyset_pages_keep_the_filters_and_never_count_or_offset(world):
    a = world["a"]
    same_moment = datetime(2026, 4, 1, 12, 0, tzinfo=UTC)  # ties on created_at: the id breaks them
    wanted = {str(_query(a["key"], prompt=f"q{n}", created_at=same_moment).pk) for n in range(53)}
    for n in range(4):  # filtered out
        _query(a["key"], prompt=f"failed {n}", status=Query.Status.FAILED, created_at=same_moment)
    client = _client(a["member"])
    params = {"status": "succeeded", "date_from": "2026-04-01"}
    with CaptureQueriesContext(connection) as sql:
        first = _get(client, params)
    log_sql = [q["sql"] for q in sql.captured_queries if "inference_query" in q["sql"]]
    assert log_sql and not any("OFFSET" in s.upper() or "COUNT(" in s.upper() for s in log_sql), log_sql
    page_one = _listed(first)
    assert len(page_one) == 50
    older = re.search(r'href="\?([^"]+)" id="older"', first).group(1).replace("&amp;", "&")
    assert "status=succeeded" in older and "date_from=2026-04-01" in older and "before=" in older
    second = _get(client, older)
    page_two = _listed(second)
    assert len(page_two) == 3 and 'id="older"' not in second
    assert set(page_one) | set(page_two) == wanted and not set(page_one) & set(page_two)
    newest = re.search(r'href="\?([^"]+)" id="newest"', second).group(1).replace("&amp;", "&")
    assert "before=" not in newest and "status=succeeded" in newest
    assert _listed(_get(client, newest)) == page_one


CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare these."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "The first is wider."}], "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_7", "content": "sunny"},
    {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
]


def _detailed(api_key, mode):
    tenant = api_key.tenant
    tenant.privacy_mode = mode
    tenant.save(update_fields=["privacy_mode"])
    query = _query(
        api_key,
        prompt="And this one?",
        messages=CONVERSATION,
        images=3,
        reasoning="Looking at the third image.",
        reasoning_tokens=4,
        tool_calls=[CALL],
        status=Query.Status.FAILED,
        error_code="cancelled",
        error_message="The client cancelled the query.",
        finish_reason="cancelled",
    )
    now = query.created_at
    Query.objects.filter(pk=query.pk).update(
        started_at=now + timedelta(seconds=0.25),
        first_token_at=now + timedelta(seconds=0.5),
        finished_at=now + timedelta(seconds=2),
    )
    privacy.on_settle(Query.objects.get(pk=query.pk))  # what the mode does not keep goes when it settles
    return Query.objects.get(pk=query.pk)


def test_the_detail_shows_the_whole_conversation_with_its_images_in_place(world):
    query = _detailed(world["a"]["key"], PrivacyMode.FULL)
    client = _client(world["a"]["member"])
    page = client.get(f"/dashboard/queries/{query.pk}/").content.decode()
    turns = re.findall(r'<li class="role-(\w+)" data-role="\w+">(.*?)</li>', page, re.S)
    assert [role for role, _ in turns] == ["system", "user", "assistant", "tool", "user"]
    first_user, last_user = turns[1][1], turns[4][1]
    # each image where the message put it: #0 and #1 before the first question, #2 after the second
    assert first_user.index("image/0") < first_user.index("image/1") < first_user.index("Compare these.")
    assert last_user.index("And this one?") < last_user.index("image/2")
    assert "get_weather({&quot;city&quot;: &quot;Paris&quot;})" in turns[2][1] and "call_7" in turns[3][1]
    for position in range(3):  # every image, and each one is served
        assert f'data-position="{position}"' in page
        image = client.get(f"/dashboard/queries/{query.pk}/image/{position}")
        assert image.status_code == 200 and image["Content-Type"] == "image/png"
    assert '<div id="reasoning" class="reasoning-box">Looking at the third image.</div>' in page
    assert '<div id="answer">answer to And this one?</div>' in page  # apart from the reasoning
    assert "10 prompt, 5 completion, 4 of it reasoning" in page
    assert "queued 0.250 s, first token 0.500 s, total 2.000 s" in page
    assert "cancelled: The client cancelled the query." in page
    assert "Everything is kept." in page and 'id="not-kept"' not in page


def test_no_images_mode_keeps_the_conversation_and_says_the_images_are_not_kept(world):
    query = _detailed(world["a"]["key"], PrivacyMode.NO_IMAGES)
    page = _client(world["a"]["owner"]).get(f"/dashboard/queries/{query.pk}/").content.decode()
    assert "Compare these." in page and "Looking at the third image." in page
    assert "<img" not in page.split('id="content"')[1]  # no picture anywhere below the outcome
    assert page.count("[image #") == 3 and "not kept" in page
    assert "Privacy mode &#x27;no_images&#x27;: the images are not kept" in page
    assert page.count("sha256 <code>") == 3  # what was sent is still described


def test_metadata_mode_shows_only_the_facts_and_says_so(world):
    query = _detailed(world["a"]["key"], PrivacyMode.METADATA)
    page = _client(world["a"]["owner"]).get(f"/dashboard/queries/{query.pk}/").content.decode()
    for content in ("Compare these.", "And this one?", "Be brief.", "Looking at the third image."):
        assert content not in page
    assert 'id="content-not-kept"' in page and "Privacy mode &#x27;metadata&#x27;" in page
    assert "10 prompt, 5 completion, 4 of it reasoning" in page and "total 2.000 s" in page
    assert page.count("sha256 <code>") == 3 and "<img" not in page
    log = _get(_client(world["a"]["owner"]))
    assert "not kept (privacy mode: metadata)" in log and "And this one?" not in log


def test_retention_removed_content_is_said_with_its_date(world):
    query = _detailed(world["a"]["key"], PrivacyMode.FULL)
    privacy.remove_content([query.pk], now=datetime(2026, 5, 2, tzinfo=UTC))
    page = _client(world["a"]["owner"]).get(f"/dashboard/queries/{query.pk}/").content.decode()
    assert "Compare these." not in page and "removed on 2026-05-02" in page
    assert 'id="query-image"' in page  # the images have a retention of their own: still kept


def test_owner_and_member_see_their_tenants_queries_others_get_404(world):
    query = _detailed(world["a"]["key"], PrivacyMode.FULL)
    url = f"/dashboard/queries/{query.pk}/"
    for user in (world["a"]["owner"], world["a"]["member"]):
        client = _client(user)
        assert client.get(url).status_code == 200
        assert str(query.pk) in _listed(_get(client))
    outsider = _client(world["b"]["owner"])
    assert outsider.get(url).status_code == 404
    assert outsider.get(f"/dashboard/queries/{query.pk}/image/0").status_code == 404
    assert str(query.pk) not in _get(outsider)
    assert _get(outsider, {"key": world["a"]["key"].pk}, status=400)  # a's key is no key of b's
    anonymous = Client()
    for page in ("/dashboard/queries/", url):
        response = anonymous.get(page)
        assert response.status_code == 302 and response["Location"].startswith("/dashboard/login/")
