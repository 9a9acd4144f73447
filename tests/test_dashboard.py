"""The tenant dashboard and the admin console, page by page, with Django's test client."""

import csv
import io

import pytest
from django.test import Client, override_settings

from accounts import services
from accounts.models import ApiKey, Membership
from inference import services as inference_services
from inference import usage
from inference.models import Query
from tests import media

pytestmark = pytest.mark.django_db


def _query(api_key, prompt="hello", status=Query.Status.SUCCEEDED):
    data = inference_services.check_input(prompt=prompt, images=[media.png(20, 10)])
    query = inference_services.accept(api_key, data, endpoint=Query.Endpoint.QUERIES)
    Query.objects.filter(pk=query.pk).update(status=status, answer="an answer", prompt_tokens=10, completion_tokens=5)
    query.refresh_from_db()
    return query


@pytest.fixture
def world(db):
    """Two tenants, each with an owner, a member and a key with one query."""
    out = {}
    for slug in ("a", "b"):
        tenant = services.create_tenant(f"Tenant {slug.upper()}", slug=slug)
        owner = services.create_user(f"owner-{slug}", password="pw-12345678")
        member = services.create_user(f"member-{slug}", password="pw-12345678")
        services.add_member(tenant, owner, Membership.Role.OWNER)
        services.add_member(tenant, member, Membership.Role.MEMBER)
        key, plaintext = services.create_api_key(tenant, f"key-{slug}")
        out[slug] = {
            "tenant": tenant,
            "owner": owner,
            "member": member,
            "key": key,
            "plaintext": plaintext,
            "query": _query(key, prompt=f"prompt of {slug}"),
        }
    return out


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_pages_need_sign_in(client):
    for url in ("/dashboard/", "/dashboard/keys/", "/dashboard/queries/", "/dashboard/playground/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/dashboard/login/")


def test_sign_in_with_the_form_and_sign_out(world):
    client = Client(enforce_csrf_checks=True)
    page = client.get("/dashboard/login/")
    token = page.cookies["csrftoken"].value
    response = client.post(
        "/dashboard/login/", {"username": "member-a", "password": "pw-12345678", "csrfmiddlewaretoken": token}
    )
    assert response.status_code == 302 and response["Location"] == "/dashboard/"
    assert "Tenant A" in client.get("/dashboard/").content.decode()
    assert (
        client.post("/dashboard/logout/", {"csrfmiddlewaretoken": client.cookies["csrftoken"].value}).status_code == 302
    )
    assert client.get("/dashboard/").status_code == 302


def test_forms_refuse_posts_without_csrf(world):
    client = Client(enforce_csrf_checks=True)
    client.force_login(world["a"]["owner"])
    assert client.post("/dashboard/keys/", {"name": "x"}).status_code == 403
    assert client.post(f"/dashboard/keys/{world['a']['key'].pk}/revoke/").status_code == 403
    assert ApiKey.objects.filter(name="x").count() == 0


def test_every_page_shows_what_it_promises_to_a_member(world):
    """README "Dashboard and admin": each page's own content, for a member (who reads, not manages)."""
    usage.record_outcome(world["a"]["query"])  # today's rollup, as a settled query would add it
    client = _client(world["a"]["member"])
    query, key = world["a"]["query"], world["a"]["key"]

    def page(url) -> str:
        response = client.get(url)
        assert response.status_code == 200, url
        return response.content.decode()

    overview = page("/dashboard/")  # this month against each key's quotas, charts of usage per day
    assert "<h1>Tenant A</h1>" in overview and "This month" in overview
    tenant = world["a"]["tenant"]
    assert (tenant.requests_per_day, tenant.tokens_per_month) == (10_000, 2_000_000)  # the defaults
    assert "1 of 10,000 (&lt;0.1%)" in overview and "15 of 2,000,000 (&lt;0.1%)" in overview  # formatted, with a bar
    assert overview.count('role="progressbar"') == 2  # requests today and tokens this month of key-a
    assert f"{tenant.requests_per_minute:,} requests per minute" in overview
    assert "Today: 1 request (0 failed, 0 refused by quotas), 15 tokens." in overview
    assert "Requests per day, by key" in overview and "<svg" in overview  # the charts
    assert f"sl_{key.prefix}_" in overview  # the key, in the quotas and in the breakdown

    keys = page("/dashboard/keys/")  # the tenant's keys; a member may not create or revoke
    assert f"sl_{key.prefix}_" in keys and ">key-a</a>" in keys and "active" in keys
    assert 'id="create-key"' not in keys and "Revoke" not in keys

    log = page("/dashboard/queries/")  # the queries, filterable by status, endpoint and key
    assert f'data-query="{query.pk}"' in log and "prompt of a" in log
    assert all(f'name="{name}"' in log for name in ("status", "endpoint", "key"))

    detail = page(f"/dashboard/queries/{query.pk}/")  # the image, answer, tokens and timings
    assert 'id="query-image"' in detail and '<div id="answer">an answer</div>' in detail
    assert "10 prompt, 5 completion" in detail and "<dt>Timings</dt>" in detail

    playground = page("/dashboard/playground/")  # images, prompt, send, the conversation; says the model is noise
    assert all(f'id="{element}"' in playground for element in ("image", "prompt", "run", "turns", "model", "thinking"))
    assert 'id="tiny-model-notice"' in playground and "random noise" in playground

    key_page = page(f"/dashboard/keys/{key.pk}/")
    assert f"sl_{key.prefix}_" in key_page and "owners and admins change keys" in key_page

    image = client.get(f"/dashboard/queries/{query.pk}/image.png")
    assert image.status_code == 200 and image["Content-Type"] == "image/png"


def test_a_member_of_a_gets_404_for_everything_of_b(world):
    client = _client(world["a"]["owner"])
    b = world["b"]
    assert client.get(f"/dashboard/queries/{b['query'].pk}/").status_code == 404
    assert client.get(f"/dashboard/queries/{b['query'].pk}/image.png").status_code == 404
    assert client.get(f"/dashboard/keys/{b['key'].pk}/").status_code == 404
    assert client.post(f"/dashboard/keys/{b['key'].pk}/revoke/").status_code == 404
    assert client.post("/dashboard/switch/", {"tenant": b["tenant"].pk}).status_code == 404
    log = client.get("/dashboard/queries/").content.decode()
    assert "prompt of a" in log and "prompt of b" not in log
    assert ApiKey.objects.get(pk=b["key"].pk).revoked_at is None


def test_tenant_switching_within_memberships(world):
    user = world["a"]["member"]
    services.add_member(world["b"]["tenant"], user, Membership.Role.MEMBER)
    client = _client(user)
    assert "prompt of a" in client.get("/dashboard/queries/").content.decode()
    assert client.post("/dashboard/switch/", {"tenant": world["b"]["tenant"].pk}).status_code == 302
    log = client.get("/dashboard/queries/").content.decode()
    assert "prompt of b" in log and "prompt of a" not in log


def test_key_is_shown_once_and_overrides_stay_within_the_tenant(world):
    client = _client(world["a"]["owner"])
    created = client.post("/dashboard/keys/", {"name": "ci", "requests_per_minute": "10"})
    assert created.status_code == 201
    page = created.content.decode()
    key = ApiKey.objects.get(name="ci")
    start = page.index(f"sl_{key.prefix}_")
    plaintext = page[start : start + 3 + 8 + 1 + 32]
    assert services.authenticate_key(plaintext).pk == key.pk and key.requests_per_minute == 10
    assert plaintext not in client.get("/dashboard/keys/").content.decode()  # never again
    too_much = client.post("/dashboard/keys/", {"name": "greedy", "requests_per_minute": "100000"})
    assert "at most 60" in too_much.content.decode()
    assert not ApiKey.objects.filter(name="greedy").exists()


def test_members_read_but_do_not_manage_keys(world):
    client = _client(world["a"]["member"])
    assert client.post("/dashboard/keys/", {"name": "nope"}).status_code == 403
    assert client.post(f"/dashboard/keys/{world['a']['key'].pk}/revoke/").status_code == 403
    assert ApiKey.objects.get(pk=world["a"]["key"].pk).revoked_at is None


def test_revoke_takes_effect_on_the_next_api_call(world, api_client):
    a = world["a"]
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {a['plaintext']}")
    assert api_client.get("/v1/models").status_code == 200
    assert _client(a["owner"]).post(f"/dashboard/keys/{a['key'].pk}/revoke/").status_code == 302
    response = api_client.get("/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "key_revoked"


def test_admin_is_staff_only_and_reviews_usage(world):
    assert _client(world["a"]["owner"]).get("/admin/usage/").status_code == 302
    staff = services.create_user("staff", password="pw-12345678")
    staff.is_staff = staff.is_superuser = True
    staff.save()
    usage.record_outcome(world["a"]["query"])
    client = _client(staff)
    page = client.get("/admin/usage/")
    assert page.status_code == 200 and b"<svg" in page.content and b"Tenant A" in page.content
    query = world["a"]["query"]
    assert client.get("/admin/inference/query/").status_code == 200
    assert client.get("/admin/inference/query/?q=prompt").status_code == 200
    detail = client.get(f"/admin/inference/query/{query.pk}/change/")
    assert detail.status_code == 200 and f"/admin/queries/{query.pk}/image/0".encode() in detail.content
    assert client.get(f"/admin/queries/{query.pk}/image.png")["Content-Type"] == "image/png"
    for url in (
        "/admin/accounts/tenant/",
        "/admin/accounts/apikey/",
        "/admin/accounts/membership/",
        "/admin/inference/usagedaily/",
    ):
        assert client.get(url).status_code == 200, url
    exported = client.post(
        "/admin/inference/query/?tenant__id__exact=" + str(world["a"]["tenant"].pk),
        {"action": "export_csv", "_selected_action": [query.pk]},
    )
    rows = list(csv.reader(io.StringIO(b"".join(exported.streaming_content).decode())))
    assert rows[0][0] == "id" and rows[1][0] == str(query.pk) and len(rows) == 2
    revoke = client.post("/admin/accounts/apikey/", {"action": "revoke", "_selected_action": [world["b"]["key"].pk]})
    assert revoke.status_code == 302 and ApiKey.objects.get(pk=world["b"]["key"].pk).revoked_at is not None


def _ids_listed(page) -> set[str]:
    import re

    return set(re.findall(r"/admin/inference/query/([0-9a-f-]{36})/change/", page.content.decode()))


def test_admin_query_list_searches_filters_and_drills_down_by_date(world, monkeypatch):
    from inference import admin as query_admin

    staff = services.create_user("staff", password="pw-12345678")
    staff.is_staff = staff.is_superuser = True
    staff.save()
    client = _client(staff)
    a, b = world["a"]["query"], world["b"]["query"]
    Query.objects.filter(pk=b.pk).update(created_at=a.created_at.replace(year=a.created_at.year - 1))
    assert _ids_listed(client.get(f"/admin/inference/query/?q={a.pk}")) == {str(a.pk)}
    assert _ids_listed(client.get("/admin/inference/query/?q=PROMPT+OF+B")) == {str(b.pk)}
    assert _ids_listed(client.get("/admin/inference/query/?q=no+such+prompt")) == set()
    # A request id (X-Request-ID) finds that request's query; a word that is no request id searches prompts.
    Query.objects.filter(pk=a.pk).update(request_id="req-from-a-log-line")
    assert _ids_listed(client.get("/admin/inference/query/?q=req-from-a-log-line")) == {str(a.pk)}
    assert _ids_listed(client.get("/admin/inference/query/?q=OF+B")) == {str(b.pk)}
    # A prompt search reads the newest ADMIN_PROMPT_SEARCH_ROWS queries (of the period picked), and says so.
    with override_settings(ADMIN_PROMPT_SEARCH_ROWS=1):
        page = client.get("/admin/inference/query/?q=PROMPT+OF+B")
        assert _ids_listed(page) == set() and "read the newest 1 queries" in page.content.decode()
        assert _ids_listed(client.get("/admin/inference/query/?q=PROMPT+OF+A")) == {str(a.pk)}
        older = client.get(f"/admin/inference/query/?q=PROMPT+OF+B&created_at__year={a.created_at.year - 1}")
        assert _ids_listed(older) == {str(b.pk)} and "of the period picked" in older.content.decode()
    assert "read the newest" not in client.get("/admin/inference/query/?q=PROMPT+OF+B").content.decode()
    # A searched list's calendar spans the whole log (not the matches' first and last day).
    searched = client.get("/admin/inference/query/?q=PROMPT+OF+B").content.decode()
    for year in (a.created_at.year - 1, a.created_at.year):
        assert f"created_at__year={year}" in searched
    model = Query.objects.get(pk=a.pk).model
    assert _ids_listed(client.get(f"/admin/inference/query/?model={model}")) == {str(a.pk), str(b.pk)}

    # The date hierarchy: the years between the first and last query, then that year's months.
    top = client.get("/admin/inference/query/").content.decode()
    for year in (a.created_at.year - 1, a.created_at.year):
        assert f"?created_at__year={year}" in top
    year = client.get(f"/admin/inference/query/?created_at__year={a.created_at.year}")
    assert _ids_listed(year) == {str(a.pk)}
    assert f"created_at__month={a.created_at.month}" in year.content.decode()

    assert "_facets" not in top  # no "show counts": it would count every filter's choices

    # Counting stops at the cap, and the page says so.
    monkeypatch.setattr(query_admin, "COUNT_CAP", 1)
    capped = client.get("/admin/inference/query/").content.decode()
    assert "more than 1 queries" in capped
    assert "more than" not in client.get(f"/admin/inference/query/?q={a.pk}").content.decode()


def test_invite_member_command_gives_access_to_that_tenant_only(world):
    from django.core.management import call_command

    call_command("invite_member", "b", "newbie", "--password", "pw-12345678")
    client = Client()
    assert client.login(username="newbie", password="pw-12345678")
    log = client.get("/dashboard/queries/").content.decode()
    assert "prompt of b" in log and "prompt of a" not in log


def test_seed_demo_fills_the_pages(db):
    from django.core.management import call_command

    call_command("seed_demo", "--queries", "50")
    from django.contrib.auth import get_user_model

    client = _client(get_user_model().objects.get(username="demo"))
    assert Query.objects.filter(tenant__slug="demo").count() == 50
    overview = client.get("/dashboard/").content.decode()
    assert "<svg" in overview and "seeded" in overview


def test_the_query_page_shows_reasoning_tool_calls_and_choices(world):
    """What the runner stores apart from the answer is shown to the tenant's members, not others."""
    query = world["a"]["query"]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    Query.objects.filter(pk=query.pk).update(
        reasoning="First I looked at the sky.",
        tool_calls=[call],
        reasoning_tokens=7,
        choices=[{"index": 0, "text": "an answer"}, {"index": 1, "text": "a second answer", "finish_reason": "stop"}],
    )
    url = f"/dashboard/queries/{query.pk}/"
    page = _client(world["a"]["member"]).get(url).content.decode()
    assert "First I looked at the sky." in page and "7 of it reasoning" in page
    assert "get_weather({&quot;city&quot;: &quot;Paris&quot;})" in page
    assert "a second answer" in page
    assert _client(world["b"]["owner"]).get(url).status_code == 404
