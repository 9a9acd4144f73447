"""Accessibility (axe-core, zero serious or critical violations) and 390 px layout of the console
pages the other browser tests do not cover: the sign-in pages, Data & privacy, and the operators'
admin pages (index, the query log and a query, tenants, keys, memberships, invitations, the
activity log, the rollups, prices). In a real headless Chromium
against the live stack; each page's axe report is written under test-output/axe/ and a screenshot
under test-output/screenshots/."""

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from playwright.sync_api import expect

from accounts.models import ApiKey, Membership, Tenant
from inference.models import Query
from tests.a11y import check_accessible, check_narrow
from tests.test_browser import PASSWORD, browser_context, from_db, owner, shot, sign_in  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)


def test_dashboard_sign_in_and_data_pages_are_accessible(owner, browser_context):  # noqa: F811
    page = browser_context.new_page()
    page.goto("/dashboard/login/")
    check_accessible(page, "dashboard sign-in")
    check_narrow(page, "dashboard sign-in")
    shot(page, "a11y-dashboard-login")

    # A failed sign-in shows its error, labelled and announced.
    page.fill("input[name=username]", "browser-owner")
    page.fill("input[name=password]", "not-the-password")
    page.click("button[type=submit]")
    check_accessible(page, "dashboard sign-in failed")

    sign_in(page, "browser-owner")
    page.goto("/dashboard/data/")
    expect(page.locator("h1")).to_be_visible()
    check_accessible(page, "dashboard data and privacy")
    check_narrow(page, "dashboard data and privacy")
    shot(page, "a11y-dashboard-data")


@pytest.fixture
def staff(db):
    call_command("seed_demo", queries=30, verbosity=0)
    return get_user_model().objects.create_superuser("a11y-admin", password=PASSWORD)


def test_admin_pages_are_accessible(staff, browser_context):  # noqa: F811
    page = browser_context.new_page()
    page.goto("/admin/login/?next=/admin/")
    check_accessible(page, "admin sign-in")
    check_narrow(page, "admin sign-in")
    page.fill("input[name=username]", "a11y-admin")
    page.fill("input[name=password]", PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#site-name")).to_be_visible()

    query_id, tenant_id, key_id, membership_id = from_db(
        lambda: (
            Query.objects.order_by("created_at").last().pk,
            Tenant.objects.first().pk,
            ApiKey.objects.first().pk,
            Membership.objects.first().pk,
        )
    )
    pages = {
        "admin index": "/admin/",
        "admin query log": "/admin/inference/query/",
        "admin query": f"/admin/inference/query/{query_id}/change/",
        "admin tenants": "/admin/accounts/tenant/",
        "admin tenant": f"/admin/accounts/tenant/{tenant_id}/change/",
        "admin api keys": "/admin/accounts/apikey/",
        "admin api key": f"/admin/accounts/apikey/{key_id}/change/",
        "admin membership": f"/admin/accounts/membership/{membership_id}/change/",
        "admin invitations": "/admin/accounts/invitation/",
        "admin activity log": "/admin/accounts/auditevent/",
        "admin rollups": "/admin/inference/usagedaily/",
        "admin prices": "/admin/inference/modelprice/",
        "admin new price": "/admin/inference/modelprice/add/",
    }
    for name, url in pages.items():
        response = page.goto(url)
        assert response.status == 200, (name, response.status)
        check_accessible(page, name)
        check_narrow(page, name)
        shot(page, "a11y-" + name.replace(" ", "-"), full_page=False)
