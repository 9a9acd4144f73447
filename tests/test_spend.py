"""Money: prices per model with their history, each query's cost at settlement, spend in the rollups,
and monthly budgets per tenant and key admitted atomically with the token quota — exact under
concurrency against the real Redis (in-process Lua calls and a live web process) and the embedded
default's counters; rebuilt after Redis lost them; shown to tenants and operators."""

import asyncio
import base64
import csv
import io
import threading
import time
import uuid
from datetime import UTC, timedelta
from decimal import Decimal

import httpx
import pytest
import redis
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import connections
from django.test import Client
from django.utils import timezone

from accounts import quotas
from accounts import services as accounts
from accounts.forms import KeyForm
from accounts.models import ApiKey, Membership
from config import money
from inference import pricing, runner, selectors, services, workers
from inference.models import ModelPrice, Query, UsageDaily
from tests import media
from tests.stack import Stack

pytestmark = pytest.mark.django_db(transaction=True)

IMAGE = base64.b64encode(media.png(32, 32)).decode()
MODEL = "glm-4.6v-flash"  # settings.INFERENCE_MODEL_NAME, the one served model of the tests
D = Decimal


def _tenant(**fields):
    defaults = {
        "requests_per_minute": None,
        "requests_per_day": None,
        "tokens_per_month": None,
        "max_concurrent_requests": None,
    }
    tag = time.monotonic_ns()
    return accounts.create_tenant(f"T{tag}", slug=f"t{tag}", **{**defaults, **fields})


def _price(input_per_million="0", output_per_million="0", per_image="0", *, model=MODEL, at=None) -> ModelPrice:
    # Written with the ORM: only the admin refuses a start in the past (tested below).
    return ModelPrice.objects.create(
        model=model,
        input_per_million=D(input_per_million),
        output_per_million=D(output_per_million),
        per_image=D(per_image),
        effective_from=at or timezone.now() - timedelta(days=40),
    )


def _no_floats(value):
    assert not isinstance(value, float), value
    return value


# --- cost arithmetic ------------------------------------------------------------------------------
def test_cost_is_exact_decimal_rounded_once_at_the_nano_quantum():
    tiny = money.Price(D("0.000001"), D("0.000001"), D(0))
    # one token at 0.000001 per million is 1e-12: rounds (half up) to 0 at the 1e-9 quantum
    assert money.cost(tiny, prompt_tokens=1, completion_tokens=0, images=0) == D("0E-9")
    # 500 tokens are 5e-10: exactly half a quantum rounds up; 499 down
    assert money.cost(tiny, prompt_tokens=500, completion_tokens=0, images=0) == D("0.000000001")
    assert money.cost(tiny, prompt_tokens=499, completion_tokens=0, images=0) == D("0E-9")
    # a reservation rounds up: one token is a whole quantum
    assert money.worst_case(tiny, prompt_tokens=1, completion_tokens=0, images=0) == D("0.000000001")
    assert money.worst_case(tiny, prompt_tokens=0, completion_tokens=0, images=0) == D("0E-9")
    # rounded once, on the sum: 300 + 300 tokens (3e-10 each, 0 if rounded apart) make 6e-10 -> 1e-9
    assert money.cost(tiny, prompt_tokens=300, completion_tokens=300, images=0) == D("0.000000001")

    # big token counts, prices with nine decimals: no digit lost (a float would lose them)
    price = money.Price(D("123456.123456789"), D("987654.987654321"), D("0.000000001"))
    prompt, completion, images = 4_000_000_000, 3_999_999_999, 1_000_000
    exact = (
        D(prompt) * price.input_per_million / D(10**6)
        + D(completion) * price.output_per_million / D(10**6)
        + D(images) * price.per_image
    )
    cost = money.cost(price, prompt_tokens=prompt, completion_tokens=completion, images=images)
    assert cost == D("4444444443.457785012") == exact.quantize(D("1e-9"))
    assert float(cost) != cost  # what a float would have made of it
    assert money.to_nano(cost) == 4444444443457785012
    assert money.from_nano(money.to_nano(cost)) == cost

    # per image only; a typical price
    assert money.cost(money.Price(D(0), D(0), D("0.0025")), prompt_tokens=9, completion_tokens=9, images=3) == D(
        "0.0075"
    )
    glm = money.Price(D("0.30"), D("0.90"), D("0.0001"))
    assert money.cost(glm, prompt_tokens=1234, completion_tokens=567, images=1) == D("0.000980500")
    # never a float in
    with pytest.raises(TypeError):
        money.to_nano(0.1)
    with pytest.raises(TypeError):
        money.cost(glm, prompt_tokens=1.0, completion_tokens=0, images=0)
    with pytest.raises(ValueError):
        money.to_nano(D("0.0000000001"))  # finer than the quantum


def test_reservation_is_the_token_bound_at_the_prices_rounded_up(settings):
    price = money.Price(D("1"), D("3"), D("0.01"))
    prompt_bound, completion = quotas.bounds("hello", 16, 2)
    assert prompt_bound == 5 + 2 * settings.IMAGE_TOKEN_BOUND + settings.TEMPLATE_TOKEN_BOUND and completion == 16
    reserved = quotas.cost_reservation(price, "hello", 16, 2)
    assert reserved == (D(prompt_bound) / 10**6 + D(48) / 10**6 + D("0.02")).quantize(D("1e-9"))
    assert quotas.cost_reservation(money.FREE, "hello", 16, 2) == 0


def test_env_currency_fails_loudly(monkeypatch):
    from django.core.exceptions import ImproperlyConfigured

    from config.env import env_currency

    monkeypatch.setenv("CURRENCY", "eur")
    assert env_currency("CURRENCY") == "EUR"
    monkeypatch.setenv("CURRENCY", "euros")
    with pytest.raises(ImproperlyConfigured, match="CURRENCY='euros' is not valid"):
        env_currency("CURRENCY")
    monkeypatch.delenv("CURRENCY")
    assert env_currency("CURRENCY") == "USD"


def _finished(api_key, *, created_at, prompt_tokens, completion_tokens, images=0, model=MODEL) -> Query:
    """A query as a worker leaves it (succeeded, tokens written), its images' rows included, then settled."""
    from inference.models import QueryImage

    query = Query.objects.create(
        tenant_id=api_key.tenant_id,
        api_key=api_key,
        model=model,
        endpoint=Query.Endpoint.QUERIES,
        status=Query.Status.SUCCEEDED,
        prompt="x",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        created_at=created_at,
        finished_at=created_at + timedelta(seconds=1),
    )
    for position in range(images):
        QueryImage.objects.create(
            query=query, position=position, sha256="0" * 64, format="PNG", size_bytes=1, width=1, height=1
        )
    assert runner.settle(query.pk)
    return Query.objects.get(pk=query.pk)


def test_the_admission_records_the_price_its_settlement_charges():
    """The row keeps its model's price of its creation as the admission read it, and settlement
    charges that, without reading the prices again: a price row rewritten afterwards (only the ORM
    can; the admin never rewrites one in effect) changes nothing. A row without a recorded price
    (written before they were recorded) is priced from the price rows, as before."""
    tenant = _tenant()
    key, _ = accounts.create_api_key(tenant, "recorded")
    _price("1.00", "2.00", "0.01")
    query = services.submit(key, endpoint=Query.Endpoint.GLM_INFER, prompt="hello", max_tokens=8)
    row = Query.objects.get(pk=query.pk)
    assert (row.price_input_per_million, row.price_output_per_million, row.price_per_image) == (
        D("1.00"),
        D("2.00"),
        D("0.01"),
    )
    assert pricing.price_of_query(row) == money.Price(D("1.00"), D("2.00"), D("0.01"))

    ModelPrice.objects.filter(model=MODEL).update(input_per_million=D("100"), output_per_million=D("200"))
    now = timezone.now()
    Query.objects.filter(pk=query.pk).update(
        status=Query.Status.SUCCEEDED, prompt_tokens=1000, completion_tokens=500, started_at=now, finished_at=now
    )
    assert runner.settle(query.pk)
    assert Query.objects.get(pk=query.pk).cost == D("0.001") + D("0.001") == D("0.002000000")

    # Without a recorded price: the rows are read (at the rewritten price, here).
    older = services.submit(key, endpoint=Query.Endpoint.GLM_INFER, prompt="hello", max_tokens=8)
    now = timezone.now()
    Query.objects.filter(pk=older.pk).update(
        price_input_per_million=None,
        price_output_per_million=None,
        price_per_image=None,
        status=Query.Status.SUCCEEDED,
        prompt_tokens=1000,
        completion_tokens=500,
        started_at=now,
        finished_at=now,
    )
    assert runner.settle(older.pk)
    assert Query.objects.get(pk=older.pk).cost == D("0.1") + D("0.1") == D("0.200000000")

    # A model without a price records a zero price: it costs nothing.
    ModelPrice.objects.filter(model=MODEL).delete()
    free = services.submit(key, endpoint=Query.Endpoint.GLM_INFER, prompt="hello", max_tokens=8)
    assert Query.objects.get(pk=free.pk).price_input_per_million == 0


# --- a price change mid-month ---------------------------------------------------------------------
def test_a_price_change_mid_month_prices_each_query_by_its_creation(settings):
    """Queries before the change keep the old price, those after get the new one, whenever they
    settle; the rollup adds both; the admin refuses to edit or delete the old row and to start a
    price in the past, and lets a scheduled one be corrected."""
    tenant = _tenant()
    key, _ = accounts.create_api_key(tenant, "priced")
    now = timezone.now()
    change = now - timedelta(hours=1)
    old = _price("1.00", "2.00", "0.01", at=now - timedelta(days=60))
    new = ModelPrice.objects.create(
        model=MODEL,
        input_per_million=D("3.00"),
        output_per_million=D("5.00"),
        per_image=D("0.02"),
        effective_from=change,
    )
    assert pricing.row_at(MODEL, change - timedelta(microseconds=1)) == old
    assert pricing.row_at(MODEL, change) == new

    before = _finished(
        key, created_at=change - timedelta(minutes=5), prompt_tokens=1000, completion_tokens=500, images=1
    )
    after = _finished(
        key, created_at=change + timedelta(minutes=5), prompt_tokens=1000, completion_tokens=500, images=1
    )
    assert before.cost == D("0.001") + D("0.001") + D("0.01") == D("0.012000000")
    assert after.cost == D("0.003") + D("0.0025") + D("0.02") == D("0.025500000")
    # a model without a price costs nothing
    free = _finished(key, created_at=now, prompt_tokens=10**6, completion_tokens=10**6, model="unpriced-model")
    assert free.cost == 0

    day_rows = UsageDaily.objects.filter(api_key=key)
    assert sum((row.spend for row in day_rows), D(0)) == before.cost + after.cost
    assert all(isinstance(row.spend, Decimal) for row in day_rows)

    # Settling again changes nothing (the rollup was added once; the cost is the same).
    assert not runner.settle(before.pk)
    assert sum((row.spend for row in UsageDaily.objects.filter(api_key=key)), D(0)) == before.cost + after.cost

    # The admin: the old price is in effect (it priced queries): never edited, never deleted.
    staff = get_user_model().objects.create_superuser("price-admin", password="pw-123456789")
    client = Client()
    client.force_login(staff)
    change_url = f"/admin/inference/modelprice/{old.pk}/change/"
    page = client.get(change_url)
    assert page.status_code == 200 and b"already in effect" in page.content
    refused = client.post(
        change_url,
        {
            "model": MODEL,
            "input_per_million": "0.5",
            "output_per_million": "0.5",
            "per_image": "0",
            "effective_from_0": "2000-01-01",
            "effective_from_1": "00:00:00",
        },
        follow=True,
    )
    assert b"cannot be edited or deleted" in refused.content
    assert ModelPrice.objects.get(pk=old.pk).input_per_million == D("1.00")
    deleted = client.post(f"/admin/inference/modelprice/{old.pk}/delete/", {"post": "yes"}, follow=True)
    assert b"cannot be edited or deleted" in deleted.content and ModelPrice.objects.filter(pk=old.pk).exists()
    bulk = client.post(
        "/admin/inference/modelprice/",
        {"action": "delete_selected", "_selected_action": [old.pk], "post": "yes"},
        follow=True,
    )
    assert bulk.status_code in (200, 403) and ModelPrice.objects.filter(pk=old.pk).exists()

    # A new price may not start in the past ...
    past = (timezone.now() - timedelta(days=1)).astimezone(UTC)
    form = {
        "model": MODEL,
        "input_per_million": "9",
        "output_per_million": "9",
        "per_image": "0",
        "effective_from_0": past.strftime("%Y-%m-%d"),
        "effective_from_1": past.strftime("%H:%M:%S"),
    }
    answer = client.post("/admin/inference/modelprice/add/", form)
    assert answer.status_code == 200 and b"may not start in the past" in answer.content
    assert not ModelPrice.objects.filter(input_per_million=9).exists()
    # ... but from a later date, and a scheduled one may still be corrected (nothing was priced by it).
    later = (timezone.now() + timedelta(days=3)).astimezone(UTC).replace(microsecond=0)
    form.update(effective_from_0=later.strftime("%Y-%m-%d"), effective_from_1=later.strftime("%H:%M:%S"))
    assert client.post("/admin/inference/modelprice/add/", form).status_code == 302
    scheduled = ModelPrice.objects.get(input_per_million=9)
    assert scheduled.created_by == staff and scheduled.effective_from == later
    form["output_per_million"] = "8"
    assert client.post(f"/admin/inference/modelprice/{scheduled.pk}/change/", form).status_code == 302
    assert ModelPrice.objects.get(pk=scheduled.pk).output_per_million == 8
    # the list says which models have no price (they cost nothing)
    listing = client.get("/admin/inference/modelprice/")
    assert listing.status_code == 200 and b"in effect" in listing.content and b"scheduled" in listing.content
    ModelPrice.objects.all().delete()
    assert b"No price set for glm-4.6v-flash" in client.get("/admin/inference/modelprice/").content


# --- budgets: exact under concurrency -------------------------------------------------------------
@pytest.fixture
def redis_counters(settings):
    """This process's quota counters in the real Redis (the production path), under a key prefix of
    this test's own."""
    from tests.stack import REDIS_TEST_DB, redis_base_url

    settings.REDIS_URL = f"{redis_base_url()}/{REDIS_TEST_DB}"
    settings.REDIS_KEY_PREFIX = f"spend-test-{uuid.uuid4().hex[:8]}"
    settings.EMBEDDED = False
    assert isinstance(quotas.backend(), quotas.RedisQuotaBackend)
    yield redis.Redis.from_url(settings.REDIS_URL)
    settings.EMBEDDED = True
    quotas.backend()


@pytest.fixture(params=["redis", "local"])
def counters(request, settings):
    if request.param == "redis":
        yield request.getfixturevalue("redis_counters")
    else:
        settings.EMBEDDED = True
        quotas._backend = None  # a fresh in-process backend
        assert isinstance(quotas.backend(), quotas.LocalQuotaBackend)
        yield None


def _admit_from_threads(api_key, n, price, **request) -> list:
    """``n`` threads call quotas.admit at once (released together); nothing settles meanwhile."""
    outcomes: list = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def hit():
        try:
            start.wait()
            try:
                admission = quotas.admit(api_key, price=price, **request)
                outcome = admission
            except Exception as exc:  # noqa: BLE001 - the refusal is the outcome
                outcome = exc
            with lock:
                outcomes.append(outcome)
        finally:
            connections.close_all()  # record_rejection opened this thread's connection

    threads = [threading.Thread(target=hit) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_200_concurrent_admissions_against_a_budget_for_50_admit_exactly_50(counters):
    price_row = _price("2.5", "7.5", "0.001")
    price = pricing.price_of(price_row)
    request = {"prompt": "what is this?", "max_tokens": 32, "images": 1}
    reserve = quotas.cost_reservation(price, request["prompt"], request["max_tokens"], request["images"])
    assert reserve > 0
    tenant = _tenant(monthly_budget=reserve * 1000)
    api_key, _ = accounts.create_api_key(tenant, "budgeted", monthly_budget=reserve * 50)
    api_key = ApiKey.objects.select_related("tenant").get(pk=api_key.pk)

    outcomes = _admit_from_threads(api_key, 200, price, **request)

    admitted = [o for o in outcomes if isinstance(o, quotas.Admission)]
    refused = [o for o in outcomes if not isinstance(o, quotas.Admission)]
    assert len(admitted) == 50 and len(refused) == 150, [type(o).__name__ for o in refused[:3]]
    assert all(o.code == "budget_exceeded" and o.status == 429 for o in refused), refused[0]
    assert all(a.reserved_cost == reserve for a in admitted)
    message = refused[0].message
    assert "This key's monthly budget" in message and "Lower max_tokens or raise the budget" in message
    assert f"{reserve.normalize():f}" in message and "USD" in message
    retry = int(refused[0].headers["Retry-After"])
    assert 1 <= retry <= 31 * 86400
    _, snap = quotas.snapshot(api_key)
    assert snap.spend_this_month == 50 * money.to_nano(reserve) == snap.tenant_spend_this_month
    assert UsageDaily.objects.get(api_key=api_key).rejected == 150

    # Settling two (a real cost below their reservation) refunds the rest, once: one more fits.
    real = D("0.000010000")
    assert 2 * real < reserve
    for admission in admitted[:2]:
        assert quotas.settle(api_key.pk, admission.id, used=10, cost=real)
        assert not quotas.settle(api_key.pk, admission.id, used=10, cost=real)  # exactly once
    _, snap = quotas.snapshot(api_key)
    assert snap.spend_this_month == 48 * money.to_nano(reserve) + 2 * money.to_nano(real)
    assert isinstance(quotas.admit(api_key, price=price, **request), quotas.Admission)
    with pytest.raises(Exception) as again:
        quotas.admit(api_key, price=price, **request)
    assert again.value.code == "budget_exceeded"


def test_large_amounts_stay_exact_to_the_nano_unit(counters):
    """Amounts in the millions (10^15 nano-units and more) are counted exactly, up to the budget cap."""
    price = pricing.price_of(_price("0", "0", "1234567.123456789"))
    tenant = _tenant(monthly_budget=money.MAX_BUDGET)
    api_key, _ = accounts.create_api_key(tenant, "big")
    api_key = ApiKey.objects.select_related("tenant").get(pk=api_key.pk)
    request = {"prompt": "x", "max_tokens": 1, "images": 1, "price": price}
    first = quotas.admit(api_key, **request)
    assert first.reserved_cost == D("1234567.123456789")
    quotas.admit(api_key, **request)
    _, snap = quotas.snapshot(api_key)
    assert snap.spend_this_month == snap.tenant_spend_this_month == 2_469_134_246_913_578
    assert quotas.settle(api_key.pk, first.id, used=1, cost=D("1234567.123456788"))  # one nano-unit refunded
    _, snap = quotas.snapshot(api_key)
    assert snap.spend_this_month == snap.tenant_spend_this_month == 2_469_134_246_913_577
    admitted = 2
    while True:
        try:
            quotas.admit(api_key, **request)
        except Exception as exc:  # noqa: BLE001 - the refusal ends the loop
            assert exc.code == "budget_exceeded"
            break
        admitted += 1
    assert admitted == 7  # floor(9,000,000 / 1,234,567.123456789), one nano-unit to spare does not make an 8th


def test_a_tenant_budget_is_shared_by_its_keys(counters):
    price = pricing.price_of(_price("0", "0", "0.01"))
    tenant = _tenant(monthly_budget=D("0.05"))  # five one-image requests, whichever keys make them
    one, _ = accounts.create_api_key(tenant, "one")
    two, _ = accounts.create_api_key(tenant, "two", monthly_budget=D("0.05"))
    one, two = (ApiKey.objects.select_related("tenant").get(pk=k.pk) for k in (one, two))
    request = {"prompt": "x", "max_tokens": 4, "images": 1, "price": price}
    for key in (one, one, one, two):
        quotas.admit(key, **request)
    last = quotas.admit(two, **request)
    with pytest.raises(Exception) as refused:
        quotas.admit(one, **request)  # the tenant's, not the key's (it has none)
    assert refused.value.code == "budget_exceeded"
    assert refused.value.message.startswith("This tenant's monthly budget of 0.05 USD cannot cover this request")
    assert "0.00 USD is left" in refused.value.message
    _, snap = quotas.snapshot(two)
    assert (snap.spend_this_month, snap.tenant_spend_this_month) == (2 * 10**7, 5 * 10**7)
    # an ended request of the second key (a failure before it ran: no cost) frees the tenant's budget for the first
    quotas.settle(two.pk, last.id, used=0, cost=D(0))
    quotas.admit(one, **request)


def test_a_key_budget_may_not_exceed_its_tenants():
    tenant = _tenant(monthly_budget=D("100"))
    with pytest.raises(ValidationError) as refused:
        accounts.create_api_key(tenant, "greedy", monthly_budget=D("100.01"))
    assert "may not exceed its tenant's" in str(refused.value) and "lower this budget" in str(refused.value)
    key, _ = accounts.create_api_key(tenant, "fine", monthly_budget=D("100"))

    form = KeyForm({"name": "k", "monthly_budget": "150"}, tenant=tenant)
    assert not form.is_valid()
    assert "may not exceed its tenant's (100 USD)" in form.errors["monthly_budget"][0]
    assert KeyForm({"name": "k", "monthly_budget": "99.5"}, tenant=tenant).is_valid()

    staff = get_user_model().objects.create_superuser("budget-admin", password="pw-123456789")
    client = Client()
    client.force_login(staff)
    page = client.post(f"/admin/accounts/apikey/{key.pk}/change/", {"name": "fine", "monthly_budget": "250"})
    assert page.status_code == 200 and b"may not exceed its tenant" in page.content
    assert ApiKey.objects.get(pk=key.pk).monthly_budget == D("100")
    # nor may the tenant's drop below a key's
    tenant.monthly_budget = D("50")
    with pytest.raises(ValidationError, match="have a higher monthly budget"):
        tenant.full_clean()
    # no tenant budget: any key budget (up to the cap Redis counts exactly)
    open_tenant = _tenant()
    accounts.create_api_key(open_tenant, "big", monthly_budget=D("9000000"))
    with pytest.raises(ValidationError):
        ApiKey(tenant=open_tenant, name="x", prefix="p", key_hash="h", monthly_budget=D("9000001")).full_clean()


# --- through the HTTP API of a live web process: 200 at once, no worker consuming -----------------
async def _burst(url: str, key: str, n: int, body: dict) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        headers = {"Authorization": f"Bearer {key}"}
        return await asyncio.gather(*(client.post(url, json=body, headers=headers) for _ in range(n)))


def test_200_concurrent_http_requests_against_a_budget_for_50_get_exactly_50(tmp_path):
    """POST /v1/queries (async jobs) to a web process on the real Redis whose queue no worker
    consumes: nothing settles (or refunds) during the burst, so the budget admits exactly 50."""
    price = pricing.price_of(_price("1.25", "10", "0.0004"))
    body = {"image": IMAGE, "prompt": "describe", "max_tokens": 24}
    reserve = quotas.cost_reservation(price, body["prompt"], body["max_tokens"], 1)
    tenant = _tenant(monthly_budget=reserve * 50)
    api_key, key = accounts.create_api_key(tenant, "http-burst")
    # A queue no worker reads, and a key prefix no other stack's sweeper works on.
    tag = uuid.uuid4().hex[:8]
    queue = f"infer.nobody-{tag}"
    stack = Stack(tmp_path, REDIS_KEY_PREFIX=f"spend-http-{tag}", INFERENCE_QUEUE=queue)
    stack.start_web()
    try:
        stack.wait_web()
        responses = asyncio.run(_burst(stack.url + "/v1/queries", key, 200, body))
    finally:
        stack.stop()
        broker = redis.Redis.from_url(stack.redis_url)
        for name in [*broker.scan_iter(f"{queue}*"), *broker.scan_iter(f"spend-http-{tag}*")]:
            broker.delete(name)  # the 50 messages nobody will take, and the counters
    statuses = [r.status_code for r in responses]
    assert statuses.count(202) == 50 and statuses.count(429) == 150, sorted(set(statuses))
    refused = [r.json() for r in responses if r.status_code == 429]
    assert {r["code"] for r in refused} == {"budget_exceeded"}
    assert "This tenant's monthly budget" in refused[0]["msg"] and "raise the budget" in refused[0]["msg"]
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)
    rows = Query.objects.filter(api_key=api_key)
    assert rows.count() == 50 and set(rows.values_list("reserved_cost", flat=True)) == {reserve}
    assert set(rows.values_list("status", flat=True)) == {Query.Status.QUEUED}  # none ran, none settled
    assert UsageDaily.objects.get(api_key=api_key).rejected == 150


# --- a query's cost end to end (the embedded default), and the refund -----------------------------
def test_a_query_stores_its_cost_and_the_unused_reservation_is_refunded(api_client, settings, png_bytes):
    price = pricing.price_of(_price("2", "4", "0.001"))
    tenant = _tenant(monthly_budget=D("10"))
    api_key, key = accounts.create_api_key(tenant, "costed", monthly_budget=D("5"))
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    answer = api_client.post(
        "/v1/glm/infer", {"image": base64.b64encode(png_bytes).decode(), "prompt": "hi", "max_tokens": 8}, format="json"
    )
    assert answer.status_code == 200, answer.content
    query = Query.objects.get(pk=answer.json()["query_id"])
    assert query.settled_at is not None
    expected = money.cost(price, prompt_tokens=query.prompt_tokens, completion_tokens=query.completion_tokens, images=1)
    assert query.cost == expected > 0
    assert query.reserved_cost == quotas.cost_reservation(price, "hi", 8, 1) > query.cost  # refunded: the rest
    _, snap = quotas.snapshot(api_key)
    assert snap.spend_this_month == money.to_nano(query.cost) == snap.tenant_spend_this_month
    assert UsageDaily.objects.get(api_key=api_key).spend == query.cost

    detail = api_client.get(f"/v1/queries/{query.pk}").json()
    assert detail["cost"] == f"{query.cost:f}" and detail["currency"] == "USD"
    assert _no_floats(detail["cost"])
    usage = api_client.get("/v1/usage").json()
    assert usage["currency"] == "USD"
    assert usage["key"]["this_month"]["spend"] == f"{query.cost:f}" == usage["tenant"]["this_month"]["spend"]
    assert usage["key"]["quotas"]["monthly_budget"] == {
        "limit": "5.000000000",
        "used": f"{query.cost:f}",
        "remaining": f"{D(5) - query.cost:f}",
    }
    assert usage["tenant"]["monthly_budget"]["limit"] == "10.000000000"

    status = selectors.budget_status(tenant)
    assert status["spent"] == query.cost and status["budget"] == D(10) and status["level"] == ""
    assert status["keys"][0]["spent"] == query.cost and status["keys"][0]["budget"] == D(5)


def test_metrics_count_spend_per_tenant_only_with_the_token(settings):
    from prometheus_client.parser import text_string_to_metric_families

    settings.METRICS_TOKEN = ""
    tenant = _tenant()
    key, _ = accounts.create_api_key(tenant, "m")
    UsageDaily.objects.create(date=timezone.now().date(), tenant=tenant, api_key=key, spend=D("1.234567891"))
    client = Client()

    def samples(**headers):
        text = client.get("/metrics", **headers).content.decode()
        return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "sightline_spend_total"]

    open_samples = samples()
    assert [s.labels for s in open_samples] == [{"currency": "USD"}]
    assert open_samples[0].value == pytest.approx(1.234567891)
    settings.METRICS_TOKEN = "metrics-secret-123"
    labelled = samples(HTTP_AUTHORIZATION="Bearer metrics-secret-123")
    mine = [s for s in labelled if s.labels.get("tenant") == tenant.slug]
    assert len(mine) == 1 and mine[0].value == pytest.approx(1.234567891) and mine[0].labels["currency"] == "USD"


# --- Redis restarted empty: the spend counters are rebuilt ----------------------------------------
def test_redis_restart_rebuilds_the_spend_counters(tmp_path, settings):
    """Redis restarted empty (a real redis-server, stopped and started without persistence): the
    key's and the tenant's spend are rebuilt from the rollups (settled queries) plus the reserved
    cost of the rows not settled yet, and the budget then admits exactly what is left."""
    from tests.test_reliability import OwnRedis

    own = OwnRedis(tmp_path)
    own.start()
    settings.REDIS_URL, settings.EMBEDDED = own.url, False
    settings.REDIS_KEY_PREFIX = f"spend-restart-{uuid.uuid4().hex[:8]}"
    try:
        price = pricing.price_of(_price("1", "2", "0.01"))
        request = {"prompt": "restart", "max_tokens": 16, "images": 1}
        reserve = quotas.cost_reservation(price, request["prompt"], request["max_tokens"], 1)
        tenant = _tenant(monthly_budget=reserve * 10)
        first, _ = accounts.create_api_key(tenant, "first")
        second, _ = accounts.create_api_key(tenant, "second")
        first, second = (ApiKey.objects.select_related("tenant").get(pk=k.pk) for k in (first, second))
        data = services.check_input(prompt=request["prompt"], images=[media.png(16, 16)], max_tokens=16)

        def accepted(api_key):
            at = quotas.now()
            admission = quotas.admit(api_key, price=pricing.price_at(MODEL, at), at=at, **request)
            return services.accept(api_key, data, endpoint=Query.Endpoint.QUERIES, admission=admission, model=MODEL)

        settled = []
        for api_key in (first, first, second):
            query = accepted(api_key)
            Query.objects.filter(pk=query.pk).update(
                status=Query.Status.SUCCEEDED, prompt_tokens=40, completion_tokens=16, finished_at=timezone.now()
            )
            assert runner.settle(query.pk)
            settled.append(Query.objects.get(pk=query.pk))
        held = [accepted(first), accepted(second)]  # queued: no worker; their reservations are held
        cost = settled[0].cost
        assert cost == money.cost(price, prompt_tokens=40, completion_tokens=16, images=1) < reserve

        def spends():
            _, a = quotas.snapshot(first)
            _, b = quotas.snapshot(second)
            return a.spend_this_month, b.spend_this_month, a.tenant_spend_this_month

        expected = (
            money.to_nano(2 * cost + reserve),
            money.to_nano(cost + reserve),
            money.to_nano(3 * cost + 2 * reserve),
        )
        assert spends() == expected

        own.stop()
        own.start()  # empty
        assert spends() == (0, 0, 0)
        assert not quotas.backend().restored()
        workers.restore_quotas()
        assert spends() == expected
        # ... and the budget admits exactly what is left of it: floor(left / reserve) more.
        left = money.to_nano(tenant.monthly_budget) - expected[2]
        fits = left // money.to_nano(reserve)
        assert fits >= 1
        for _ in range(fits):
            quotas.admit(first, price=price, **request)
        with pytest.raises(Exception) as refused:
            quotas.admit(second, price=price, **request)
        assert refused.value.code == "budget_exceeded"
        # the held ones still settle (and refund) once
        for query in held:
            Query.objects.filter(pk=query.pk).update(
                status=Query.Status.FAILED, error_code="cancelled", finished_at=timezone.now()
            )
            assert runner.settle(query.pk)
        assert Query.objects.get(pk=held[0].pk).cost == 0
        _, snap = quotas.snapshot(first)
        assert snap.tenant_spend_this_month == money.to_nano(3 * cost + fits * reserve)
    finally:
        settings.EMBEDDED = True
        own.stop()


# --- what is left, for tenants; spend for operators ------------------------------------------------
def _member_client(tenant, role=Membership.Role.OWNER):
    user = accounts.create_user(f"u{time.monotonic_ns()}", password="pw-123456789")
    accounts.add_member(tenant, user, role)
    client = Client()
    client.force_login(user)
    return client


def test_dashboard_banner_at_80_and_100_percent():
    tenant = _tenant(monthly_budget=D("10"))
    key, _ = accounts.create_api_key(tenant, "k")
    client = _member_client(tenant)
    today = timezone.now().date()
    row = UsageDaily.objects.create(date=today, tenant=tenant, api_key=key, spend=D("7.99"))
    for page in ("/dashboard/", "/dashboard/keys/", "/dashboard/queries/", "/dashboard/data/"):
        assert b'id="budget-banner"' not in client.get(page).content, page
    row.spend = D("8")
    row.save()
    for page in (
        "/dashboard/",
        "/dashboard/keys/",
        "/dashboard/queries/",
        "/dashboard/playground/",
        "/dashboard/data/",
    ):
        body = client.get(page).content.decode()
        assert "80% of this month&#x27;s budget is spent" in body and "8.00 of 10.00 USD" in body, page
    row.spend = D("10.5")
    row.save()
    body = client.get("/dashboard/keys/").content.decode()
    assert "100% of this month&#x27;s budget is spent" in body and 'role="alert"' in body
    # last month's spend is not this month's
    row.date = today.replace(day=1) - timedelta(days=1)
    row.save()
    assert b'id="budget-banner"' not in client.get("/dashboard/").content
    # a key's budget at 80% shows too
    key.monthly_budget = D("1")
    key.save()
    UsageDaily.objects.create(date=today, tenant=tenant, api_key=key, spend=D("0.9"))
    assert "this month&#x27;s budget of the key k is spent: 90%" in client.get("/dashboard/").content.decode()


def _seed_spend():
    today = timezone.now().date()
    a = _tenant(monthly_budget=D("100"))
    b = _tenant(monthly_budget=D("10"))
    c = _tenant()
    ka, _ = accounts.create_api_key(a, "ka")
    kb, _ = accounts.create_api_key(b, "kb")
    kc, _ = accounts.create_api_key(c, "kc")
    rows = [
        (a, ka, today, "30.000000001", 10),
        (a, ka, today - timedelta(days=3), "12.5", 5),
        (b, kb, today, "8.5", 2),  # b at 85% of its budget: listed first
        (c, kc, today - timedelta(days=10), "400.123456789", 40),
        (c, kc, today - timedelta(days=45), "7", 1),  # outside 30 days
    ]
    for tenant, key, date, spend, requests in rows:
        UsageDaily.objects.create(date=date, tenant=tenant, api_key=key, spend=D(spend), requests=requests)
    return a, b, c


def test_the_admin_spend_page_and_csv_are_for_staff_and_match_the_rollups():
    a, b, c = _seed_spend()
    _price("0.3", "0.9", "0.0001")
    anonymous = Client()
    assert anonymous.get("/admin/spend/").status_code == 302
    assert anonymous.get("/admin/spend/spend.csv").status_code == 302
    member = _member_client(a)  # signed in, not staff
    for url in ("/admin/spend/", "/admin/spend/spend.csv"):
        answer = member.get(url)
        assert answer.status_code == 302 and "/admin/login/" in answer["Location"], url

    staff = get_user_model().objects.create_superuser("spend-admin", password="pw-123456789")
    client = Client()
    client.force_login(staff)
    page = client.get("/admin/spend/?days=30")
    assert page.status_code == 200
    html = page.content.decode()
    since = timezone.now().date() - timedelta(days=29)

    def ranged(tenant):
        rows = UsageDaily.objects.filter(tenant=tenant, date__gte=since)
        return sum((r.spend for r in rows), D(0)).quantize(D("1e-9"))

    for tenant in (a, b, c):
        assert f'<data value="{ranged(tenant)}">' in html, tenant.slug
    order = [t.slug for t in (b, c, a)]  # b (85% of its budget) first, then the most spent
    positions = [html.index(f'data-tenant="{slug}"') for slug in order]
    assert positions == sorted(positions)
    rows = [e["tenant"].slug for e in selectors.spend_by_tenant(since, timezone.now().date())]
    assert rows[0] == b.slug and rows.index(c.slug) < rows.index(a.slug)  # after the alerts, most spent first
    assert "(over 80%)" in html and "85%" in html
    assert "glm-4.6v-flash" in html and "0.3" in html and "in effect" in html  # the price history
    total = sum((ranged(t) for t in (a, b, c)), D(0))
    assert f'<data value="{total}">' in html
    # 7 days leave out c's spend of 10 days ago; a custom range takes it
    assert f'<data value="{ranged(c)}">' not in client.get("/admin/spend/?days=7").content.decode()
    custom = client.get(f"/admin/spend/?from={since - timedelta(days=20)}&to={since}").content.decode()
    assert '<data value="7.000000000">' in custom
    refused = client.get("/admin/spend/?from=2026-13-01")
    assert refused.status_code == 400 and "A custom range needs both dates" in refused.content.decode()
    # linked from every admin page
    assert b'href="/admin/spend/"' in client.get("/admin/").content

    export = client.get("/admin/spend/spend.csv")
    assert export.status_code == 200 and export["Content-Type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(export.content.decode())))
    by = {(row["tenant"], row["month"]): row for row in table}
    for tenant in (a, b, c):
        for day in UsageDaily.objects.filter(tenant=tenant).dates("date", "month"):
            month = day.strftime("%Y-%m")
            rows = UsageDaily.objects.filter(tenant=tenant, date__year=day.year, date__month=day.month)
            assert D(by[(tenant.slug, month)]["spend"]) == sum((r.spend for r in rows), D(0))
            assert int(by[(tenant.slug, month)]["requests"]) == sum(r.requests for r in rows)
            assert by[(tenant.slug, month)]["currency"] == "USD"
    assert len(table) == len({(r.tenant_id, r.date.strftime("%Y-%m")) for r in UsageDaily.objects.all()})
    assert by[(a.slug, timezone.now().strftime("%Y-%m"))]["budget"] == "100.000000000"


def test_the_admin_spend_page_ranges_and_breakdowns_by_tenant_and_model():
    """The spend page reads ``?range=``, ``?from=&to=`` and ``?by=tenant|model`` as the usage page
    does (dashboard/usage_charts.parse): its chart and total are the rollups' spend of the settled
    queries; bad input is a message (400), never a 500."""
    from dashboard import charts

    first, second = _tenant(monthly_budget=D("1000")), _tenant()
    ka, _ = accounts.create_api_key(first, "ka")
    kb, _ = accounts.create_api_key(second, "kb")
    _price("1000", "2000", "0.5")
    _price("10", "20", "0", model="other-model")
    now = timezone.now()
    for key, days_ago, model in ((ka, 0, MODEL), (ka, 2, "other-model"), (kb, 5, MODEL), (kb, 20, "other-model")):
        query = _finished(
            key,
            created_at=now - timedelta(days=days_ago),
            prompt_tokens=1234,
            completion_tokens=567,
            images=1,
            model=model,
        )
        assert query.cost > 0
    today = timezone.now().astimezone(UTC).date()
    staff = get_user_model().objects.create_superuser("spend-ranges", password="pw-123456789")
    client = Client()
    client.force_login(staff)

    def spend(since, until, **match):
        rows = UsageDaily.objects.filter(date__gte=since, date__lte=until, **match)
        return sum((r.spend for r in rows), D(0)).quantize(D("1e-9"))

    week = today - timedelta(days=6)
    page = client.get("/admin/spend/?range=7&by=model")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Spend, last 7 days" in html and "Spend per day (USD), by model, all tenants" in html
    assert f'<p id="spend-total">Total: <data value="{spend(week, today)}">' in html
    assert spend(week, today) == spend(week, today, model=MODEL) + spend(week, today, model="other-model")
    for model in (MODEL, "other-model"):
        for row in UsageDaily.objects.filter(date__gte=week, model=model):
            day_spend = spend(row.date, row.date, model=model)
            assert f"<title>{row.date.isoformat()} · {model}: {charts.amount(day_spend)} USD" in html, (model, row.date)
    # by tenant (the default), 30 days: each tenant's spend per day in its segments
    html = client.get("/admin/spend/?range=30").content.decode()
    assert "Spend per day (USD), by tenant, all tenants" in html
    for tenant in (first, second):
        for row in UsageDaily.objects.filter(tenant=tenant, date__gte=today - timedelta(days=29)):
            day_spend = spend(row.date, row.date, tenant=tenant)
            assert f"<title>{row.date.isoformat()} · {tenant.name}: {charts.amount(day_spend)} USD" in html
    assert 'id="usage-range"' in html and 'id="usage-by"' in html  # the usage page's form
    # a custom range: only the query of 20 days ago
    since, until = today - timedelta(days=25), today - timedelta(days=15)
    custom = client.get(f"/admin/spend/?range=custom&from={since}&to={until}&by=model")
    assert custom.status_code == 200
    html = custom.content.decode()
    assert f"Spend, {since} to {until}" in html and spend(since, until) == spend(since, until, model="other-model") > 0
    assert f'<p id="spend-total">Total: <data value="{spend(since, until)}">' in html
    assert f"<title>{(now - timedelta(days=20)).astimezone(UTC).date().isoformat()}: " in html  # one group: no "of"
    # the older links still work
    assert client.get("/admin/spend/?days=90").status_code == 200
    bad = {
        "range=banana": "“banana” is not a range",
        "from=2026-02-30&to=2026-03-01": "“2026-02-30” is not a date for “from”",
        "by=key": "“key” is not a breakdown: choose tenant or model.",
        "by=%3Cb%3E": "“&lt;b&gt;” is not a breakdown",
        f"from={today}&to={today + timedelta(days=1)}": "ends in the future",
        f"from={today}&to={today - timedelta(days=3)}": "swap the dates",
    }
    for query, message in bad.items():
        page = client.get(f"/admin/spend/?{query}")
        assert page.status_code == 400, query
        html = page.content.decode()
        assert 'id="usage-errors"' in html and message in html, query
        assert "Showing the last 30 days by tenant instead." in html, query
        assert f'<data value="{spend(today - timedelta(days=29), today)}">' in html, query


def test_the_spend_page_and_the_banner_in_a_browser(live_stack):
    """The admin's spend page and a dashboard page with the banner, in Chromium: axe-core (no
    serious or critical violation), usable at 390 px, screenshots."""
    from playwright.sync_api import expect, sync_playwright

    from tests.a11y import check_accessible, check_narrow
    from tests.test_browser import CHROMIUM, SCREENSHOTS

    a, b, c = _seed_spend()
    _price("0.3", "0.9", "0.0001")
    get_user_model().objects.create_superuser("spend-browser", password="pw-123456789")
    owner = accounts.create_user("banner-owner", password="pw-123456789")
    accounts.add_member(b, owner, Membership.Role.OWNER)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            context = browser.new_context(base_url=live_stack.url, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.goto("/admin/login/?next=/admin/")
            page.fill("input[name=username]", "spend-browser")
            page.fill("input[name=password]", "pw-123456789")
            page.click("input[type=submit]")
            page.click("#sightline-nav >> text=Spend")
            expect(page.locator("#spend-tenants tbody tr").first).to_have_attribute("data-tenant", b.slug)
            expect(page.locator("svg.chart").first).to_be_visible()
            page.screenshot(path=str(SCREENSHOTS / "admin-spend.png"), full_page=True)
            check_accessible(page, "admin spend")
            check_narrow(page, "admin spend")

            other = browser.new_context(base_url=live_stack.url, viewport={"width": 1280, "height": 900})
            dash = other.new_page()
            dash.goto("/dashboard/login/")
            dash.fill("input[name=username]", "banner-owner")
            dash.fill("input[name=password]", "pw-123456789")
            dash.click("button[type=submit]")
            expect(dash.locator("header")).to_contain_text("banner-owner")
            dash.goto("/dashboard/keys/")
            expect(dash.locator("#budget-banner")).to_contain_text("80% of this month's budget is spent")
            dash.screenshot(path=str(SCREENSHOTS / "dashboard-budget-banner.png"), full_page=True)
            check_accessible(dash, "dashboard budget banner")
            check_narrow(dash, "dashboard budget banner")
        finally:
            browser.close()
