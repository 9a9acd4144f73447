"""The overview and the admin's usage page: rollups per model and endpoint, the breakdown selectors
(figures against the queries they were settled from, percentiles from the histograms, groups that
add up to the totals), the range and breakdown parameters (bad input is a message, never a 500),
the charts' SVG, who may see what, and the pages in a real Chromium (hover a bar, switch range and
breakdown, axe-core, 390 px)."""

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from django.http import QueryDict
from django.test import Client

from accounts import services
from accounts.models import Membership
from dashboard import charts, usage_charts
from inference import runner, selectors, usage
from inference import services as inference_services
from inference.models import Query, UsageDaily
from tests.test_browser import browser_context  # noqa: F401 (the fixture)

pytestmark = pytest.mark.django_db

TODAY = datetime.now(UTC).date()
FIGURES = ("requests", "succeeded", "failed", "rejected", "prompt_tokens", "completion_tokens", "tokens")


def settled_query(api_key, *, endpoint, model="glm-a", days_ago=0, ok=True, ms=120, prompt=10, completion=5):
    """A query accepted through the admission's write, ended ``days_ago`` days ago after ``ms``
    milliseconds, and settled (runner.settle: the quota refund and the rollup, as a worker does)."""
    data = inference_services.check_input(prompt="how many?")
    query = inference_services.accept(api_key, data, endpoint=endpoint, model=model)
    created = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0) - timedelta(days=days_ago)
    Query.objects.filter(pk=query.pk).update(
        created_at=created,
        started_at=created,
        finished_at=created + timedelta(milliseconds=ms),
        status=Query.Status.SUCCEEDED if ok else Query.Status.FAILED,
        prompt_tokens=prompt if ok else None,
        completion_tokens=completion if ok else None,
        error_code="" if ok else "engine_error",
    )
    assert runner.settle(query.pk)
    return Query.objects.get(pk=query.pk)


@pytest.fixture
def usage_world(db):
    """Tenant A: keys "alpha" and "beta", two models, three endpoints, over three days, a few
    failures; tenant B: one key and one query (never to be seen by A)."""
    a = services.create_tenant("Tenant A", slug="tenant-a")
    b = services.create_tenant("Tenant B", slug="tenant-b")
    alpha, _ = services.create_api_key(a, "alpha")
    beta, _ = services.create_api_key(a, "beta")
    other, _ = services.create_api_key(b, "b-key")
    E = Query.Endpoint
    plan = [
        (alpha, E.CHAT_COMPLETIONS, "glm-a", 0, True, 40, 100, 20),
        (alpha, E.CHAT_COMPLETIONS, "glm-a", 0, True, 300, 1200, 34),
        (alpha, E.GLM_INFER, "glm-b", 0, False, 10, 0, 0),
        (beta, E.QUERIES, "glm-a", 0, True, 900, 7, 3),
        (beta, E.QUERIES, "glm-b", 1, True, 150, 55, 45),
        (alpha, E.GLM_INFER, "glm-a", 1, True, 3000, 1000, 999),
        (beta, E.CHAT_COMPLETIONS, "glm-b", 2, False, 10, 0, 0),
        (beta, E.CHAT_COMPLETIONS, "glm-b", 2, True, 60, 2500, 500),
    ]
    queries = [
        settled_query(key, endpoint=endpoint, model=model, days_ago=ago, ok=ok, ms=ms, prompt=p, completion=c)
        for key, endpoint, model, ago, ok, ms, p, c in plan
    ]
    settled_query(other, endpoint=E.QUERIES, model="glm-secret-b")
    usage.record_rejection(alpha, "rate_limited", datetime.now(UTC), model="glm-a", endpoint=E.CHAT_COMPLETIONS)
    return {"a": a, "b": b, "alpha": alpha, "beta": beta, "queries": queries}


def _expected(queries, day, keep=lambda q: True) -> dict:
    mine = [q for q in queries if q.created_at.date() == day and keep(q)]
    out = {
        "requests": len(mine),
        "succeeded": sum(q.status == Query.Status.SUCCEEDED for q in mine),
        "failed": sum(q.status == Query.Status.FAILED for q in mine),
        "prompt_tokens": sum(q.prompt_tokens or 0 for q in mine),
        "completion_tokens": sum(q.completion_tokens or 0 for q in mine),
    }
    out["tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


def test_rollups_are_per_key_model_and_endpoint(usage_world):
    rows = UsageDaily.objects.filter(tenant=usage_world["a"], date=TODAY)
    assert sorted((r.api_key.name, r.model, r.endpoint, r.requests, r.rejected) for r in rows) == [
        ("alpha", "glm-a", "chat_completions", 2, 1),  # the refusal is counted on the row it asked for
        ("alpha", "glm-b", "glm_infer", 1, 0),
        ("beta", "glm-a", "queries", 1, 0),
    ]
    # A second outcome of the same day, key, model and endpoint is added to the same row.
    settled_query(usage_world["beta"], endpoint=Query.Endpoint.QUERIES, model="glm-a", prompt=1, completion=1)
    row = UsageDaily.objects.get(api_key=usage_world["beta"], date=TODAY, model="glm-a")
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (2, 8, 4)


@pytest.mark.parametrize("by", ["key", "model", "endpoint"])
def test_the_breakdown_adds_up_to_the_queries(usage_world, by):
    queries, a = usage_world["queries"], usage_world["a"]
    data = selectors.usage_breakdown(start=TODAY - timedelta(days=6), end=TODAY, by=by, tenant_id=a.pk)
    assert data["days"] == [TODAY - timedelta(days=n) for n in range(6, -1, -1)]
    attribute = {"key": "api_key_id", "model": "model", "endpoint": "endpoint"}[by]
    for n, day in enumerate(data["days"]):
        total = data["totals"][n]
        expected = _expected(queries, day)
        assert {name: total[name] for name in expected} == expected, day
        assert total["rejected"] == (1 if day == TODAY else 0)
        for name in FIGURES:  # the groups add up to the day's total
            assert sum(group["days"][n][name] for group in data["groups"]) == total[name], (day, name)
        for group in data["groups"]:
            mine = _expected(queries, day, lambda q, g=group: getattr(q, attribute) == g["value"])
            assert {name: group["days"][n][name] for name in mine} == mine, (day, group["label"])
            rate = group["days"][n]["error_rate"]
            assert rate == (mine["failed"] / mine["requests"] if mine["requests"] else None)
    assert data["summary"]["requests"] == len(queries) and data["summary"]["rejected"] == 1
    # Tenant B's query is not in tenant A's figures, in no group.
    assert all("secret" not in str(group["label"]) for group in data["groups"])


def test_groups_beyond_the_top_are_summed_as_other(usage_world):
    a = usage_world["a"]
    data = selectors.usage_breakdown(start=TODAY - timedelta(days=6), end=TODAY, by="endpoint", tenant_id=a.pk, top=1)
    labels = [group["label"] for group in data["groups"]]
    # chat completions has most requests (4); the two others are "other"
    assert labels == ["POST /v1/chat/completions", "other (2 more)"]
    assert data["groups"][1]["summary"]["requests"] == 4 and data["summary"]["requests"] == 8
    # one group beyond the top is shown by its own name, not as "other"
    two = selectors.usage_breakdown(start=TODAY - timedelta(days=6), end=TODAY, by="model", tenant_id=a.pk, top=1)
    assert [group["label"] for group in two["groups"]] == ["glm-a", "glm-b"]  # 4 each; glm-a had a refusal
    assert not any(group["value"] == selectors.OTHER for group in two["groups"])


def test_rows_from_before_the_model_was_recorded_are_shown_as_earlier(usage_world):
    a, alpha = usage_world["a"], usage_world["alpha"]
    UsageDaily.objects.create(date=TODAY - timedelta(days=3), tenant=a, api_key=alpha, requests=4, succeeded=4)
    data = selectors.usage_breakdown(start=TODAY - timedelta(days=6), end=TODAY, by="model", tenant_id=a.pk)
    earlier = next(group for group in data["groups"] if group["value"] == "")
    assert earlier["label"] == "(earlier)" and earlier["summary"]["requests"] == 4
    assert data["summary"]["requests"] == len(usage_world["queries"]) + 4


def test_latency_percentiles_come_from_the_histograms(db):
    tenant = services.create_tenant("Timed", slug="timed")
    key, _ = services.create_api_key(tenant, "timed")
    # 50 fast (≤ 50 ms), 45 middling (≤ 400 ms), 5 slow (≤ 6400 ms)
    for ms, count in ((30, 50), (300, 45), (5000, 5)):
        for _ in range(count):
            settled_query(key, endpoint=Query.Endpoint.QUERIES, ms=ms)
    data = selectors.usage_breakdown(start=TODAY, end=TODAY, by="key", tenant_id=tenant.pk)
    day = data["totals"][0]
    assert (day["p50_ms"], day["p95_ms"], day["p99_ms"]) == (50, 400, 6400)
    histogram = [0] * (len(UsageDaily.LATENCY_BUCKETS_MS) + 1)
    for row in UsageDaily.objects.filter(tenant=tenant):
        histogram = [x + y for x, y in zip(histogram, row.latency_histogram, strict=True)]
    assert day["histogram"] == histogram and sum(histogram) == 100
    assert UsageDaily.percentile_ms(histogram, 95) == 400
    # Failed queries count as requests, not in the latency histogram.
    settled_query(key, endpoint=Query.Endpoint.QUERIES, ok=False, ms=99_000)
    again = selectors.usage_breakdown(start=TODAY, end=TODAY, by="key", tenant_id=tenant.pk)["totals"][0]
    assert again["requests"] == 101 and sum(again["histogram"]) == 100 and again["p99_ms"] == 6400


def test_the_other_readers_of_the_rollups_still_sum_every_row(usage_world):
    from inference import workers

    a, alpha = usage_world["a"], usage_world["alpha"]
    queries = [q for q in usage_world["queries"] if q.api_key_id == alpha.pk]
    month_start = TODAY.replace(day=1)
    in_month = [q for q in queries if q.created_at.date() >= month_start]
    per_key = selectors.usage_per_key(a.pk, month_start=month_start, today=TODAY)[alpha.pk]
    assert per_key["tokens_month"] == sum(q.total_tokens or 0 for q in in_month)
    assert per_key["requests_today"] == sum(q.created_at.date() == TODAY for q in queries)
    totals = selectors.usage_totals(a.pk, month_start, alpha.pk)
    assert totals["total_tokens"] == per_key["tokens_month"] and totals["rejected"] == 1
    tenant_row = next(t for t in selectors.usage_by_tenant(TODAY - timedelta(days=6)) if t["tenant"] == a)
    assert tenant_row["requests"] == len(usage_world["queries"])
    assert workers.restore_quotas() >= 2  # the counters rebuilt from every row of the month
    from accounts import quotas

    assert quotas.snapshot(alpha)[1].tokens_this_month == per_key["tokens_month"]


def _params(text: str) -> QueryDict:
    return QueryDict(text)


def test_range_and_breakdown_parameters():
    parse = usage_charts.parse
    view = parse(_params(""), today=TODAY)
    assert (view.start, view.end, view.by, view.preset, view.errors) == (
        TODAY - timedelta(days=29),
        TODAY,
        "key",
        30,
        [],
    )
    assert parse(_params("range=7&by=model"), today=TODAY).days == 7
    assert parse(_params("range=90&by=endpoint"), today=TODAY).by == "endpoint"
    assert parse(_params("days=90"), today=TODAY).days == 90  # the admin's older links
    custom = parse(
        _params(f"range=custom&from={TODAY - timedelta(days=10)}&to={TODAY - timedelta(days=3)}"), today=TODAY
    )
    assert (custom.start, custom.end, custom.days, custom.preset, custom.errors) == (
        TODAY - timedelta(days=10),
        TODAY - timedelta(days=3),
        8,
        None,
        [],
    )
    # A preset wins over dates left in the form.
    assert parse(_params(f"range=7&from=2020-01-01&to={TODAY}"), today=TODAY).days == 7
    bad = {
        "range=14": "is not a range",
        "range=custom&from=2026-13-40&to=2026-01-01": "is not a date for “from”",
        "range=custom&from=2026-01-01": "needs both dates",
        f"from={TODAY}&to={TODAY - timedelta(days=1)}": "swap the dates",
        f"from={TODAY}&to={TODAY + timedelta(days=1)}": "ends in the future",
        f"from={TODAY - timedelta(days=400)}&to={TODAY}": "at most 366 days",
        "by=colour": "is not a breakdown",
        "from=%00&to=x": "is not a date",
    }
    for query, message in bad.items():
        view = parse(_params(query), today=TODAY)
        assert any(message in error for error in view.errors), (query, view.errors)
        assert view.days == 30 and view.end == TODAY  # the default stands in


def test_charts_svg_axis_labels_titles_and_text_alternative():
    days = [TODAY - timedelta(days=n) for n in range(89, -1, -1)]
    series = [("alpha", [1234 * (n % 3) for n in range(90)], charts.PALETTE[0]), ("beta", [7] * 90, charts.PALETTE[1])]
    html = str(charts.stacked_bar_chart(days, series, title="Requests per day", unit="requests"))
    assert 'role="img"' in html and 'aria-label="Requests per day, ' in html
    # each segment's exact value, with thousands separators, in its <title>
    first = days[2]
    assert f"<title>{first.isoformat()} · alpha: 2,468 requests (of 2,475)</title>" in html
    # round tick values, with separators
    ticks = re.findall(r'text-anchor="end">([\d,]+)</text>', html)
    assert ticks == ["0", "1,000", "2,000", "3,000"]
    # the date labels under the bars do not overlap
    labels = [(float(x), text) for x, text in re.findall(r'<text x="([\d.]+)"[^>]*class="x-label">([^<]+)<', html)]
    assert 5 <= len(labels) < 90
    for (x1, t1), (x2, _) in zip(labels, labels[1:], strict=False):
        assert x2 - x1 >= len(t1) * charts.CHAR_PX, (t1, x1, x2)
    # the legend and the data table
    assert 'class="legend"' in html and "<summary>Requests per day — the figures</summary>" in html
    assert f'<th scope="row">{first.isoformat()}</th><td>2,468</td><td>7</td><td>2,475</td>' in html
    # bar_chart keeps its signature; under 100 px high it is a sparkline
    old = str(charts.bar_chart([("2026-01-01", 3), ("2026-01-02", 1500)], title="x", color="#123456", height=180))
    assert "<title>2026-01-02: 1,500</title>" in old and 'fill="#123456"' in old
    spark = str(charts.bar_chart([("a", 1)], title="tiny", height=40))
    assert "<details" not in spark and "<title>a: 1</title>" in spark
    lines = str(
        charts.line_chart(days[:3], [("p95", [50, None, 400], "#000")], title="Latency", fmt=charts.milliseconds)
    )
    assert f"<title>{days[2].isoformat()} · p95: 400 ms</title>" in lines and lines.count("<polyline") == 2
    assert charts.nice_ticks(0.23, integer=False) == [0, 0.1, 0.2, 0.3]


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_owner_and_member_see_their_tenant_and_an_outsider_nothing(usage_world):
    a, b = usage_world["a"], usage_world["b"]
    owner = services.create_user("owner-a", password="pw-12345678")
    member = services.create_user("member-a", password="pw-12345678")
    outsider = services.create_user("outsider", password="pw-12345678")
    services.add_member(a, owner, Membership.Role.OWNER)
    services.add_member(a, member, Membership.Role.MEMBER)
    b_owner = services.create_user("owner-b", password="pw-12345678")
    services.add_member(b, b_owner, Membership.Role.OWNER)
    for user in (owner, member):
        page = _client(user).get("/dashboard/?range=7&by=model")
        assert page.status_code == 200
        html = page.content.decode()
        assert "Usage, last 7 days, by model" in html and "glm-a" in html and "glm-secret-b" not in html
        total = sum(q.total_tokens or 0 for q in usage_world["queries"])
        assert f'<tr id="usage-total"><th scope="row">All</th><td>8</td><td>{total:,}</td>' in html
    assert _client(outsider).get("/dashboard/").status_code == 404
    other = _client(b_owner).get("/dashboard/?by=key").content.decode()
    assert "alpha" not in other and "b-key" in other
    assert _client(owner).get("/admin/usage/").status_code == 302  # operators only


def test_bad_parameters_are_a_message_not_a_500(usage_world):
    owner = services.create_user("owner-a", password="pw-12345678")
    services.add_member(usage_world["a"], owner, Membership.Role.OWNER)
    staff = services.create_user("staff", password="pw-12345678")
    staff.is_staff = staff.is_superuser = True
    staff.save()
    bad = {
        "range=banana": "“banana” is not a range",
        "from=2026-02-30&to=2026-03-01": "“2026-02-30” is not a date for “from”",
        "by=%3Cscript%3E": "“&lt;script&gt;” is not a breakdown",
        "from=9999-01-01&to=1": "“1” is not a date for “to”",
    }
    for client, url in ((_client(owner), "/dashboard/"), (_client(staff), "/admin/usage/")):
        for query, message in bad.items():
            page = client.get(f"{url}?{query}")
            assert page.status_code == 400, (url, query)
            html = page.content.decode()
            assert 'id="usage-errors"' in html and message in html, (url, query)
            assert "Showing the last 30 days by key instead." in html
        assert client.get(f"{url}?range=custom&from={TODAY - timedelta(days=2)}&to={TODAY}").status_code == 200


def test_the_admin_usage_page_breaks_down_all_tenants(usage_world):
    staff = services.create_user("staff", password="pw-12345678")
    staff.is_staff = staff.is_superuser = True
    staff.save()
    html = _client(staff).get("/admin/usage/?range=7&by=key").content.decode()
    assert "Usage, last 7 days" in html and "Requests per day, by key, all tenants" in html
    assert "Tenant A / alpha" in html and "Tenant B / b-key" in html
    html = _client(staff).get("/admin/usage/?range=90&by=endpoint").content.decode()
    assert "POST /v1/chat/completions" in html and "p95 latency" in html


# --- in a real browser -------------------------------------------------------------------------


@pytest.fixture
def browser_world(transactional_db):
    from tests.test_browser import PASSWORD

    tenant = services.create_tenant("Chart Co", slug="chart-co")
    owner = services.create_user("chart-owner", password=PASSWORD)
    services.add_member(tenant, owner, Membership.Role.OWNER)
    staff = services.create_user("chart-admin", password=PASSWORD)
    staff.is_staff = staff.is_superuser = True
    staff.save()
    key, _ = services.create_api_key(tenant, "charted")
    E = Query.Endpoint
    for n in range(12):
        settled_query(
            key,
            endpoint=(E.CHAT_COMPLETIONS, E.GLM_INFER, E.WEBSOCKET)[n % 3],
            model=("glm-a", "glm-b")[n % 2],
            days_ago=n % 4,
            ok=n % 5 != 4,
            ms=40 + 150 * n,
            prompt=1000 + n,
            completion=37 * n,
        )
    return {"tenant": tenant, "key": key}


@pytest.mark.django_db(transaction=True)
def test_the_overview_in_a_browser(browser_world, live_stack, browser_context):  # noqa: F811
    from playwright.sync_api import expect

    from tests.a11y import check_accessible, check_narrow
    from tests.test_browser import PASSWORD, SCREENSHOTS, from_db, shot, sign_in

    tenant = browser_world["tenant"]
    # A viewer in India (UTC+5:30): the page's timestamps are shown in their time zone.
    viewer = browser_context.browser.new_context(
        base_url=live_stack.url, viewport={"width": 1280, "height": 900}, timezone_id="Asia/Kolkata", locale="en-US"
    )
    page = viewer.new_page()
    sign_in(page, "chart-owner")
    page.goto("/dashboard/?range=7&by=endpoint")
    expect(page.locator("#usage-title")).to_have_text("Usage, last 7 days, by endpoint")

    # Hover today's bar of chat completions in the requests chart: its <title> is the rollups' figure.
    chart = page.locator("#charts svg.chart-bars").first
    segment = chart.locator(f'rect.bar[data-date="{TODAY.isoformat()}"]').first
    segment.hover()
    tooltip = segment.locator("title").text_content()
    match = re.fullmatch(rf"{TODAY.isoformat()} · (.+): ([\d,]+) requests \(of ([\d,]+)\)", tooltip)
    assert match, tooltip
    label, value, total = match.group(1), int(match.group(2).replace(",", "")), int(match.group(3).replace(",", ""))
    endpoint = next(value for value, name in Query.Endpoint.choices if name == label)

    def stored():
        rows = UsageDaily.objects.filter(tenant=tenant, date=TODAY)
        return sum(r.requests for r in rows if r.endpoint == endpoint), sum(r.requests for r in rows)

    assert (value, total) == from_db(stored)
    segment.hover()
    chart.screenshot(path=str(SCREENSHOTS / "overview-chart-hover.png"))  # the hovered segment, outlined
    # The tokens chart's bar of the same day, in the hovered-element's accessible tooltip too.
    tokens_bar = page.locator("#charts svg.chart-bars").nth(1).locator(f'rect.bar[data-date="{TODAY.isoformat()}"]')
    tokens_bar.first.hover()
    tokens_text = tokens_bar.first.locator("title").text_content()
    tokens_total = from_db(
        lambda: sum(r.prompt_tokens + r.completion_tokens for r in UsageDaily.objects.filter(tenant=tenant, date=TODAY))
    )
    assert tokens_text.endswith(f"(of {tokens_total:,})"), tokens_text
    # The quota bars say what the rollups say, formatted.
    month_tokens = from_db(
        lambda: sum(
            r.prompt_tokens + r.completion_tokens
            for r in UsageDaily.objects.filter(tenant=tenant, date__gte=TODAY.replace(day=1))
        )
    )
    expect(page.locator("#key-quotas")).to_contain_text(f"{month_tokens:,} of {tenant.tokens_per_month:,}")
    # Timestamps in the viewer's time zone (the script replaced the server's UTC text).
    stamp = page.locator("#today time")
    expect(stamp).to_contain_text("GMT+5:30")
    when = datetime.fromisoformat(stamp.get_attribute("datetime")).astimezone(timezone(timedelta(hours=5, minutes=30)))
    expect(stamp).to_contain_text(f"{when:%b} {when.day}, {when.year}, {when.hour % 12 or 12}:{when:%M}")
    assert stamp.get_attribute("title").endswith("UTC")  # the server's UTC text, kept as the title
    shot(page, "overview-charts")

    # Switch the range and the breakdown with the form.
    page.select_option("#usage-range", "30")
    page.select_option("#usage-by", "model")
    page.click("#usage-show")
    expect(page.locator("#usage-title")).to_have_text("Usage, last 30 days, by model")
    expect(page.locator("#charts .legend").first).to_contain_text("glm-a")
    expect(page.locator("#charts .legend").first).to_contain_text("glm-b")
    assert page.locator("#charts svg.chart-bars").first.get_attribute("data-points") == "30"
    # A custom range, then a bad one: a message, the default range shown.
    page.fill("#usage-from", (TODAY - timedelta(days=2)).isoformat())
    page.fill("#usage-to", TODAY.isoformat())
    page.select_option("#usage-range", "custom")
    page.click("#usage-show")
    expect(page.locator("#usage-title")).to_contain_text(f"{TODAY - timedelta(days=2)} to {TODAY}")
    page.goto("/dashboard/?from=2026-02-30&to=yesterday")
    expect(page.locator("#usage-errors")).to_contain_text("is not a date for “from”")
    page.goto("/dashboard/?range=30&by=model")
    check_accessible(page, "overview")
    check_narrow(page, "overview")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "overview-narrow")
    page.set_viewport_size({"width": 1280, "height": 900})

    # The admin's usage page, the same charts across tenants.
    admin_page = browser_context.new_page()
    admin_page.goto("/admin/login/?next=/admin/usage/")
    admin_page.fill("input[name=username]", "chart-admin")
    admin_page.fill("input[name=password]", PASSWORD)
    admin_page.click("input[type=submit]")
    expect(admin_page.locator("h1")).to_have_text("Usage, last 30 days")
    admin_page.select_option("#usage-by", "endpoint")
    admin_page.select_option("#usage-range", "7")
    admin_page.click("#usage-show")
    expect(admin_page.locator("h1")).to_have_text("Usage, last 7 days")
    expect(admin_page.locator("#usage-groups")).to_contain_text("POST /v1/chat/completions")
    check_accessible(admin_page, "admin usage")
    check_narrow(admin_page, "admin usage")
    shot(admin_page, "admin-usage-charts")
    viewer.close()
