"""Members (dashboard): invitation links, roles, removal, the last-owner rule and the activity log,
with Django's test client against the real database. Every endpoint for an owner, a member (403)
and an outsider (404, or the sign-in page when signed out)."""

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.db import connections, transaction
from django.test import Client
from django.utils import timezone
from playwright.sync_api import expect

from accounts import keys, services
from accounts.models import AuditEvent, Invitation, Membership
from tests.a11y import check_accessible, check_narrow
from tests.test_browser import browser_context, from_db, shot, sign_in  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db
PASSWORD = "pw-12345678"


@pytest.fixture
def team(db):
    tenant = services.create_tenant("Team A", slug="team-a")
    other = services.create_tenant("Team B", slug="team-b")
    people = {}
    for name, role, where in (
        ("owner", Membership.Role.OWNER, tenant),
        ("admin", Membership.Role.ADMIN, tenant),
        ("member", Membership.Role.MEMBER, tenant),
        ("outsider", Membership.Role.OWNER, other),
    ):
        people[name] = services.create_user(name, password=PASSWORD)
        services.add_member(where, people[name], role)
    return {"tenant": tenant, "other": other, **people}


def _client(user=None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def _invite(client, role="member") -> str:
    response = client.post("/dashboard/members/invitations/", {"role": role})
    assert response.status_code == 201, response.content
    link = re.search(r'id="invitation-link">([^<]+)<', response.content.decode()).group(1)
    assert link.startswith("http://testserver/dashboard/invite/")
    return link.removeprefix("http://testserver")


def _membership(team, name):
    return Membership.objects.get(user=team[name], tenant=team["tenant"])


def test_every_endpoint_for_owner_member_outsider_and_signed_out(team):
    pending, _ = services.create_invitation(tenant=team["tenant"], role="member", created_by=team["owner"])
    target = _membership(team, "member")
    posts = [
        ("/dashboard/members/invitations/", {"role": "member"}),
        (f"/dashboard/members/invitations/{pending.pk}/revoke/", {}),
        (f"/dashboard/members/{target.pk}/role/", {f"m{target.pk}-role": "admin"}),
        (f"/dashboard/members/{target.pk}/remove/", {}),
    ]
    # signed out: the sign-in page, for the list and every change
    for url, data in [("/dashboard/members/", None), *posts]:
        response = _client().post(url, data) if data is not None else _client().get(url)
        assert response.status_code == 302 and response["Location"].startswith("/dashboard/login/"), url
    # members and admins read the list, and may change nothing: 403
    for who in ("member", "admin"):
        page = _client(team[who]).get("/dashboard/members/")
        assert page.status_code == 200 and "owner" in page.content.decode()
        assert 'id="create-invitation"' not in page.content.decode()
        for url, data in posts:
            assert _client(team[who]).post(url, data).status_code == 403, (who, url)
    # an owner of another tenant: Team A's invitation and members do not exist for them (404)
    outsider = _client(team["outsider"])
    listed = re.findall(r'<tr data-member="\d+">\s*<td>(\w+)', outsider.get("/dashboard/members/").content.decode())
    assert listed == ["outsider"]
    for url, data in posts[1:]:
        assert outsider.post(url, data).status_code == 404, url
    # nothing of the above changed anything
    assert Invitation.objects.get(pk=pending.pk).state() == "pending"
    assert Membership.objects.get(pk=target.pk).role == "member"
    # the owner does each
    owner = _client(team["owner"])
    assert owner.get("/dashboard/members/").status_code == 200
    _invite(owner)
    assert owner.post(posts[1][0]).status_code == 302
    assert owner.post(*posts[2]).status_code == 302
    assert Membership.objects.get(pk=target.pk).role == "admin"
    assert owner.post(posts[3][0]).status_code == 302
    assert not Membership.objects.filter(pk=target.pk).exists()


def test_invitation_lifecycle_create_accept_reuse_refused(team):
    owner = _client(team["owner"])
    link = _invite(owner, role="admin")
    token = link.rstrip("/").rsplit("/", 1)[1]
    invitation = Invitation.objects.get()
    assert invitation.token_hash == keys.hash_key(token) and token not in invitation.token_hash  # stored hashed
    assert token not in owner.get("/dashboard/members/").content.decode()  # shown once

    invitee = Client()
    page = invitee.get(link)
    assert page.status_code == 200 and "Join Team A" in page.content.decode()
    weak = invitee.post(link, {"action": "signup", "username": "newbie", "password1": "short", "password2": "short"})
    assert weak.status_code == 400 and "too short" in weak.content.decode()  # Django's password validators
    assert not Membership.objects.filter(user__username="newbie").exists()
    taken = invitee.post(link, {"action": "signup", "username": "member", "password1": PASSWORD, "password2": PASSWORD})
    assert taken.status_code == 400 and "already exists" in taken.content.decode()

    joined = invitee.post(
        link,
        {
            "action": "signup",
            "username": "newbie",
            "password1": "a-long-pass-phrase",
            "password2": "a-long-pass-phrase",
        },
    )
    assert joined.status_code == 302 and joined["Location"] == "/dashboard/"
    overview = invitee.get("/dashboard/")  # signed in, on the dashboard of the tenant
    assert overview.status_code == 200 and "Team A" in overview.content.decode()
    membership = Membership.objects.get(user__username="newbie")
    assert membership.tenant == team["tenant"] and membership.role == "admin"
    invitation.refresh_from_db()
    assert invitation.state() == "accepted" and invitation.accepted_by == membership.user
    assert Client().login(username="newbie", password="a-long-pass-phrase")

    # used: a second use is refused plainly, whoever tries
    again = Client().get(link)
    assert again.status_code == 410 and "used already" in again.content.decode()
    reuse = Client().post(
        link, {"action": "signup", "username": "second", "password1": PASSWORD, "password2": PASSWORD}
    )
    assert reuse.status_code == 410 and not Membership.objects.filter(user__username="second").exists()
    assert Client().get("/dashboard/invite/not-a-real-token/").status_code == 404


def test_a_signed_in_user_accepts_into_their_own_account(team):
    link = _invite(_client(team["owner"]))
    outsider = _client(team["outsider"])
    assert "Join as outsider" in outsider.get(link).content.decode()
    assert outsider.post(link, {"action": "join"}).status_code == 302
    assert Membership.objects.get(user=team["outsider"], tenant=team["tenant"]).role == "member"
    # the session now looks at the tenant joined
    assert "<h1>Team A</h1>" in outsider.get("/dashboard/").content.decode()
    # a member already: refused (409), and the link stays unused
    second = _invite(_client(team["owner"]))
    refused = _client(team["member"]).post(second, {"action": "join"})
    assert refused.status_code == 409 and "member of Team A already" in refused.content.decode()
    assert Invitation.objects.filter(accepted_at=None).count() == 1


def test_expired_and_revoked_links_are_refused(team, settings):
    owner = _client(team["owner"])
    expired_link = _invite(owner)
    Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    response = Client().get(expired_link)
    assert response.status_code == 410 and "expired" in response.content.decode()
    post = Client().post(
        expired_link, {"action": "signup", "username": "late", "password1": PASSWORD, "password2": PASSWORD}
    )
    assert post.status_code == 410 and not Membership.objects.filter(user__username="late").exists()

    revoked_link = _invite(owner)
    invitation = Invitation.objects.get(expires_at__gt=timezone.now())
    assert owner.post(f"/dashboard/members/invitations/{invitation.pk}/revoke/").status_code == 302
    response = Client().get(revoked_link)
    assert response.status_code == 410 and "revoked" in response.content.decode()
    # revoking it twice: a clear refusal, not an error
    again = owner.post(f"/dashboard/members/invitations/{invitation.pk}/revoke/")
    assert again.status_code == 409 and "invitation_not_pending" in again.content.decode()

    settings.INVITATION_TTL_HOURS = 5
    before = timezone.now()
    new, _ = services.create_invitation(tenant=team["tenant"], role="member", created_by=team["owner"])
    assert timedelta(hours=5) <= new.expires_at - before < timedelta(hours=5, minutes=1)


def test_the_last_owner_cannot_be_demoted_or_removed(team):
    owner = _client(team["owner"])
    mine = _membership(team, "owner")
    demote = owner.post(f"/dashboard/members/{mine.pk}/role/", {f"m{mine.pk}-role": "member"})
    assert demote.status_code == 409 and "last owner" in demote.content.decode()
    remove = owner.post(f"/dashboard/members/{mine.pk}/remove/")
    assert remove.status_code == 409 and "last_owner" in remove.content.decode()
    assert Membership.objects.get(pk=mine.pk).role == "owner"
    # with a second owner, the first may step down
    admin = _membership(team, "admin")
    assert owner.post(f"/dashboard/members/{admin.pk}/role/", {f"m{admin.pk}-role": "owner"}).status_code == 302
    assert owner.post(f"/dashboard/members/{mine.pk}/role/", {f"m{mine.pk}-role": "member"}).status_code == 302
    # now "admin" is the last owner: the service refuses whoever asks
    with pytest.raises(services.MemberChangeRefused) as refused:
        services.remove_member(membership=_membership(team, "admin"), actor=team["admin"])
    assert refused.value.code == "last_owner" and refused.value.status == 409


def test_every_change_is_recorded_and_shown(team):
    owner = _client(team["owner"])
    link = _invite(owner, role="member")
    _invite(owner)
    second = Invitation.objects.order_by("-pk").first()
    owner.post(f"/dashboard/members/invitations/{second.pk}/revoke/")
    Client().post(link, {"action": "signup", "username": "joiner", "password1": PASSWORD, "password2": PASSWORD})
    joiner = Membership.objects.get(user__username="joiner")
    owner.post(f"/dashboard/members/{joiner.pk}/role/", {f"m{joiner.pk}-role": "admin"})
    owner.post(f"/dashboard/members/{joiner.pk}/remove/")
    created = owner.post("/dashboard/keys/", {"name": "audited"})
    assert created.status_code == 201
    key = team["tenant"].api_keys.get(name="audited")
    assert (
        owner.post(f"/dashboard/keys/{key.pk}/", {"name": "audited-2", "requests_per_minute": "5"}).status_code == 302
    )
    assert owner.post(f"/dashboard/keys/{key.pk}/revoke/").status_code == 302

    events = list(AuditEvent.objects.filter(tenant=team["tenant"]).order_by("created_at", "id"))
    assert [(e.action, e.actor_name) for e in events] == [
        ("invitation.created", "owner"),
        ("invitation.created", "owner"),
        ("invitation.revoked", "owner"),
        ("invitation.accepted", "joiner"),
        ("member.role_changed", "owner"),
        ("member.removed", "owner"),
        ("key.created", "owner"),
        ("key.edited", "owner"),
        ("key.revoked", "owner"),
    ]
    assert events[4].details == {"from": "member", "to": "admin"} and events[4].target == "member joiner"
    assert events[7].details == {"name": ["audited", "audited-2"], "requests_per_minute": [None, 5]}
    assert not AuditEvent.objects.filter(tenant=team["other"]).exists()

    # shown on the members page, to every member: who, what, when (newest first)
    page = _client(team["member"]).get("/dashboard/members/").content.decode()
    activity = page.split('id="activity"')[1]
    shown = re.findall(r'<tr data-action="([^"]+)">\s*<td>([^<]+)</td>', activity)
    assert shown == [(e.action, e.actor_name) for e in reversed(events)]
    assert re.findall(r'<time datetime="([^"]+)"', activity) == [e.created_at.isoformat() for e in reversed(events)]
    assert "revoked a key: key audited-2" in activity


def test_an_operators_key_edit_and_revocation_in_the_admin_are_recorded(team):
    from django.contrib.auth import get_user_model

    key, _ = services.create_api_key(team["tenant"], "ops", created_by=team["owner"])
    operator = get_user_model().objects.create_superuser("operator", password=PASSWORD)
    admin = _client(operator)
    url = f"/admin/accounts/apikey/{key.pk}/change/"
    form = {"name": "ops-renamed", "expires_at_0": "2030-01-02", "expires_at_1": "03:04:05", "requests_per_minute": "7"}
    assert admin.post(url, form).status_code == 302
    revoke = admin.post("/admin/accounts/apikey/", {"action": "revoke", "_selected_action": [key.pk]})
    assert revoke.status_code == 302
    edited, revoked = AuditEvent.objects.filter(tenant=team["tenant"], actor=operator).order_by("id")
    assert edited.action == "key.edited" and revoked.action == "key.revoked"
    assert edited.details == {
        "name": ["ops", "ops-renamed"],
        "expires_at": [None, "2030-01-02T03:04:05Z"],
        "requests_per_minute": [None, 7],
    }
    assert "operator" in _client(team["member"]).get("/dashboard/members/").content.decode().split('id="activity"')[1]


@pytest.mark.django_db(transaction=True)
def test_two_owners_demoting_each_other_at_once_leave_one_owner(team):
    """The last-owner rule holds under concurrency: while one demotion's transaction is open (the
    other owner demoted, not yet committed), a second demotion waits for it and is then refused."""
    services.change_role(membership=_membership(team, "admin"), role="owner", actor=team["owner"])
    inside = threading.Event()

    def first():
        try:
            with transaction.atomic():
                services.change_role(membership=_membership(team, "admin"), role="member", actor=team["owner"])
                inside.set()
                time.sleep(1)  # the second demotion starts meanwhile
            return "changed"
        finally:
            connections.close_all()

    def second():
        try:
            assert inside.wait(timeout=30)
            services.change_role(membership=_membership(team, "owner"), role="member", actor=team["admin"])
            return "changed"
        except services.MemberChangeRefused as refused:
            return refused.code
        finally:
            connections.close_all()

    with ThreadPoolExecutor(2) as pool:
        outcomes = [pool.submit(first), pool.submit(second)]
        assert [outcome.result() for outcome in outcomes] == ["changed", "last_owner"]
    assert list(
        Membership.objects.filter(tenant=team["tenant"], role="owner").values_list("user__username", flat=True)
    ) == ["owner"]


@pytest.mark.django_db(transaction=True)
def test_an_invitation_accepted_in_a_second_browser(team, live_stack, browser_context):  # noqa: F811
    """The owner creates a link in one browser; someone else opens it in another (no session),
    chooses a username and a password, and lands signed in on the tenant's dashboard."""
    page = browser_context.new_page()
    sign_in(page, "owner", PASSWORD)
    page.click("header nav >> text=Members")
    expect(page.locator("h1")).to_have_text("Members of Team A")
    page.select_option("#create-invitation select[name=role]", "admin")
    page.click("#create-invitation button[type=submit]")
    link = page.locator("#invitation-link").inner_text().strip()
    assert link.startswith(live_stack.url + "/dashboard/invite/")
    page.click("#copy-invitation")
    expect(page.locator("#copied-invitation")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == link
    shot(page, "members-invitation-created")
    check_accessible(page, "Members (owner, invitation link shown)")
    check_narrow(page, "Members (owner, invitation link shown)")

    invitee_context = browser_context.browser.new_context(
        base_url=live_stack.url, viewport={"width": 1280, "height": 900}
    )
    try:
        invitee = invitee_context.new_page()
        invitee.goto(link)
        expect(invitee.locator("h1")).to_have_text("Join Team A")
        expect(invitee.locator("#join")).to_have_count(0)  # nobody signed in there
        shot(invitee, "invitation-page")
        check_accessible(invitee, "Invitation page")
        check_narrow(invitee, "Invitation page")
        invitee.fill("#signup input[name=username]", "invited-one")
        invitee.fill("#signup input[name=password1]", "short")
        invitee.fill("#signup input[name=password2]", "short")
        invitee.click("#signup button[type=submit]")
        expect(invitee.locator("#signup")).to_contain_text("too short")  # Django's password validators
        invitee.fill("#signup input[name=password1]", "a-long-pass-phrase")
        invitee.fill("#signup input[name=password2]", "a-long-pass-phrase")
        invitee.click("#signup button[type=submit]")
        expect(invitee.locator("header")).to_contain_text("invited-one")
        assert invitee.url == live_stack.url + "/dashboard/"
        expect(invitee.locator("h1")).to_have_text("Team A")
        expect(invitee.locator("#messages")).to_contain_text("you are admin")
        shot(invitee, "invitation-accepted-dashboard")
        role = from_db(lambda: Membership.objects.get(user__username="invited-one").role)
        assert role == "admin"
        # the link is used now: opened again, it says so
        invitee.goto(link)
        expect(invitee.locator("#invitation-gone")).to_contain_text("used already")
        shot(invitee, "invitation-used")
    finally:
        invitee_context.close()

    page.goto("/dashboard/members/")
    expect(page.locator("#members")).to_contain_text("invited-one")
    expect(page.locator("#activity tbody tr").first).to_contain_text("invited-one")
    expect(page.locator("#activity tbody tr").first).to_contain_text("accepted an invitation")
    shot(page, "members-page")
    check_accessible(page, "Members (owner)")
    check_narrow(page, "Members (owner)")
