"""Hardening (issue 9, items 10-13): the secret key and HTTPS settings of a deployment, what the
open /metrics may tell, the failed sign-in limit, and formulas in the admin's CSV export.

Settings are checked in real processes (`manage.py check`, a Celery worker) started with the
environment under test; pages with Django's test client against the test PostgreSQL (and, for the
sign-in limit in production, the test Redis)."""

import csv
import io
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from accounts import services
from config import env
from inference import services as inference_services
from inference import usage
from inference.models import Query
from tests import media
from tests.conftest import REPO

STRONG_KEY = "a-strong-key-for-this-test-only-" + "0123456789abcdefghijklmnopqrstuvwxyz"
# What a deployment's environment holds besides the variables under test (no settings of this run).
BASE_ENV = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHONUNBUFFERED": "1"}


def _manage(*args: str, **environ: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env={**BASE_ENV, **environ},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- item 10: SECRET_KEY, HTTPS settings, check --deploy ----------------------------------------
@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"DATABASE_URL": "postgres://postgres@127.0.0.1:5432/x"}, "SECRET_KEY is missing"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/0", "SECRET_KEY": "change-me"}, "SECRET_KEY is too weak"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/0", "SECRET_KEY": "ab" * 40}, "SECRET_KEY is too weak"),
        (
            {
                "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/x",
                "SECRET_KEY": "sightline-insecure-development-key-set-SECRET_KEY-in-production",
            },
            "SECRET_KEY is missing",
        ),
    ],
)
def test_a_deployment_refuses_to_start_without_a_strong_secret_key(environ, says):
    result = _manage("check", **environ)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured: " + says), result.stderr
    assert "secrets.token_urlsafe(50)" in last_line  # says how to make one


def test_the_embedded_default_and_debug_run_on_the_development_key():
    assert _manage("check").returncode == 0
    assert _manage("check", DEBUG="1", DATABASE_URL="postgres://postgres@127.0.0.1:5432/x").returncode == 0
    assert _manage("check", DATABASE_URL="postgres://postgres@127.0.0.1:5432/x", SECRET_KEY=STRONG_KEY).returncode == 0


def test_a_worker_refuses_to_start_without_a_secret_key():
    redis_url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    argv = [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", f"infer.nokey-{uuid.uuid4().hex[:6]}"]
    argv += ["--without-gossip", "--without-mingle", "-n", f"nokey-{uuid.uuid4().hex[:6]}@%h"]
    # Bounded: without the check the worker would start and serve (the timeout then fails the test).
    result = subprocess.run(
        argv, cwd=REPO, env={**BASE_ENV, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY is missing" in result.stdout + result.stderr


def test_bad_values_in_the_environment_fail_loudly(monkeypatch):
    monkeypatch.setenv("SECURE_SSL_REDIRECT", "ture")
    with pytest.raises(ImproperlyConfigured, match="SECURE_SSL_REDIRECT='ture' is not valid"):
        env.env_bool("SECURE_SSL_REDIRECT")
    monkeypatch.setenv("SECURE_HSTS_SECONDS", "1y")
    with pytest.raises(ImproperlyConfigured, match="SECURE_HSTS_SECONDS='1y' is not valid: want a whole number"):
        env.env_int("SECURE_HSTS_SECONDS", 0)
    monkeypatch.setenv("SECURE_PROXY_SSL_HEADER", "X-Forwarded-Proto: https")
    with pytest.raises(ImproperlyConfigured, match="SECURE_PROXY_SSL_HEADER"):
        env.env_proxy_ssl_header("SECURE_PROXY_SSL_HEADER")
    for value in ("X-Forwarded-Proto", "HTTP_X_FORWARDED_PROTO", "x-forwarded-proto"):
        monkeypatch.setenv("SECURE_PROXY_SSL_HEADER", value)
        assert env.env_proxy_ssl_header("SECURE_PROXY_SSL_HEADER") == ("HTTP_X_FORWARDED_PROTO", "https")
    monkeypatch.setenv("SECURE_SSL_REDIRECT", "off")
    assert env.env_bool("SECURE_SSL_REDIRECT", True) is False
    # and at start: a process refuses a bad value rather than running on the default
    result = _manage("check", SESSION_COOKIE_SECURE="maybe")
    assert result.returncode != 0 and "SESSION_COOKIE_SECURE='maybe' is not valid" in result.stderr


def _readme_production_exports() -> list[str]:
    """The `export` lines of the README's production steps (the environment every process shares)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Production\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("export ")]


def test_check_deploy_is_clean_in_the_readme_production_environment():
    exports = _readme_production_exports()
    documented = {word.split("=", 1)[0] for line in exports for word in shlex.split(line, comments=True)[1:]}
    for name in (
        "SECRET_KEY",
        "SECURE_SSL_REDIRECT",
        "SECURE_HSTS_SECONDS",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS",
        "SECURE_HSTS_PRELOAD",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
        "SECURE_PROXY_SSL_HEADER",
    ):
        assert name in documented, name
    # The README's own lines, run by a shell as an operator would (the key is generated there).
    script = "set -euo pipefail\n" + "\n".join(exports) + '\nexec "$0" manage.py check --deploy --fail-level WARNING'
    result = subprocess.run(
        ["bash", "-c", script, sys.executable],
        cwd=REPO,
        env=BASE_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout, result.stdout + result.stderr


def test_health_answers_plain_http_when_ssl_redirect_is_on(db, settings):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    client = Client()
    assert client.get("/health").status_code == 200  # a probe over plain HTTP
    assert client.get("/health/ready").status_code in (200, 503)  # answered, not redirected
    redirected = client.get("/dashboard/login/")
    assert redirected.status_code == 301 and redirected["Location"] == "https://testserver/dashboard/login/"
    assert client.get("/healthy-looking/").status_code == 301  # only /health and below are exempt
    # behind the trusted proxy, a request it marks as HTTPS is served
    assert client.get("/dashboard/login/", HTTP_X_FORWARDED_PROTO="https").status_code == 200


# --- item 11: /metrics names tenants only for the token's holder ---------------------------------
def _usage_samples(text: str) -> dict:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("sightline_requests", "sightline_tokens", "sightline_request_duration"))
    }


def test_open_metrics_name_no_tenant_and_the_token_shows_each(db, settings):
    now = datetime.now(UTC)
    for slug, refusals in (("secret-customer", 2), ("other-customer", 3)):
        key, _ = services.create_api_key(services.create_tenant(slug.title(), slug=slug), "k")
        for _ in range(refusals):
            usage.record_rejection(key, "rate_limited", now)

    settings.METRICS_TOKEN = ""
    open_text = Client().get("/metrics").content.decode()
    assert "customer" not in open_text and 'tenant="' not in open_text
    samples = _usage_samples(open_text)
    assert samples[("sightline_requests_total", frozenset({("outcome", "rejected")}))] == 5
    assert samples[("sightline_request_duration_seconds_count", frozenset())] == 0
    assert all("tenant" not in dict(labels) for _, labels in samples)

    settings.METRICS_TOKEN = "scrape-token"
    assert Client().get("/metrics").status_code == 401
    text = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-token").content.decode()
    samples = _usage_samples(text)
    for slug, refusals in (("secret-customer", 2), ("other-customer", 3)):
        labels = frozenset({("tenant", slug), ("outcome", "rejected")})
        assert samples[("sightline_requests_total", labels)] == refusals


# --- item 12: failed sign-ins ----------------------------------------------------------------------
@pytest.fixture(params=["embedded", "redis"])
def signin_counter(request, settings):
    """The failed sign-in counter in-process (embedded default) or in the test Redis (production),
    under a key prefix of this test's own. Passwords are hashed with a fast hasher: these tests try
    dozens, and the default PBKDF2 takes ~1 s each on a loaded machine (the limit's window is time)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    if request.param == "embedded":
        yield lambda: None
        return
    from inference.workers import client

    settings.EMBEDDED = False
    settings.REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    settings.REDIS_KEY_PREFIX = f"sightline-test-signin-{uuid.uuid4().hex[:8]}"

    def counted_in_redis():
        # Checked by the test while the counts live: they expire with the window (a test that
        # waits the window out finds none at teardown).
        assert list(client().scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:*"))

    yield counted_in_redis
    keys = list(client().scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:*"))
    if keys:
        client().delete(*keys)


def _address() -> str:
    return f"2001:db8::{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}"  # a fresh client per test


def _sign_in(username, password, address, url="/dashboard/login/"):
    client = Client()
    response = client.post(url, {"username": username, "password": password}, REMOTE_ADDR=address)
    return response, client


def test_sign_in_is_refused_after_ten_failed_passwords(db, signin_counter):
    tag = uuid.uuid4().hex[:6]
    victim, bystander = f"victim-{tag}", f"bystander-{tag}"
    services.create_user(victim, password="right-password-1")
    services.create_user(bystander, password="right-password-2")
    attacker = _address()
    for n in range(10):
        response, _ = _sign_in(victim, f"guess-{n}", attacker)
        assert response.status_code == 200 and b"didn't match" in response.content

    # the right password now: refused without being checked, and nobody is signed in
    refused, client = _sign_in(victim, "right-password-1", attacker)
    assert refused.status_code == 429
    assert "Too many failed sign-in attempts; wait 15 minutes" in refused.content.decode()
    signin_counter()
    assert 800 < int(refused["Retry-After"]) <= 900
    assert client.get("/dashboard/").status_code == 302
    # the username is limited from any address, the address for any username, the admin's login too
    assert _sign_in(victim, "right-password-1", _address())[0].status_code == 429
    assert _sign_in(bystander, "right-password-2", attacker)[0].status_code == 429
    assert _sign_in(victim, "right-password-1", _address(), url="/admin/login/")[0].status_code == 429
    # others sign in
    assert _sign_in(bystander, "right-password-2", _address())[0].status_code == 302


def test_a_successful_sign_in_does_not_reset_the_address_count(db, signin_counter):
    tag = uuid.uuid4().hex[:6]
    services.create_user(f"someone-{tag}", password="right-password-3")
    shared = _address()  # e.g. an office behind one address: an attacker and a user
    for n in range(9):
        assert _sign_in(f"nobody-{tag}-{n}", "guess", shared)[0].status_code == 200
    assert _sign_in(f"someone-{tag}", "right-password-3", shared)[0].status_code == 302
    assert _sign_in(f"nobody-{tag}-9", "guess", shared)[0].status_code == 200  # the tenth failure
    assert _sign_in(f"someone-{tag}", "right-password-3", shared)[0].status_code == 429
    # the admin's login counts failures with the same code
    admin_address = _address()
    for _ in range(10):
        assert _sign_in(f"admin-{tag}", "guess", admin_address, url="/admin/login/")[0].status_code == 200
    assert _sign_in(f"admin-{tag}", "guess", admin_address, url="/admin/login/")[0].status_code == 429


def test_the_limit_lifts_when_the_window_has_passed(db, settings, signin_counter):
    settings.SIGNIN_WINDOW_SECONDS = 5
    tag = uuid.uuid4().hex[:6]
    services.create_user(f"patient-{tag}", password="right-password-4")
    address = _address()
    for _ in range(10):
        _sign_in(f"patient-{tag}", "wrong", address)
    refused = _sign_in(f"patient-{tag}", "right-password-4", address)[0]
    assert refused.status_code == 429 and "wait 1 minute " in refused.content.decode()
    signin_counter()
    deadline = time.monotonic() + 15
    while (response := _sign_in(f"patient-{tag}", "right-password-4", address)[0]).status_code == 429:
        assert time.monotonic() < deadline, "still refused 15 s after a 5 s window"
        time.sleep(0.2)
    assert response.status_code == 302


# --- item 13: CSV export -------------------------------------------------------------------------
def test_csv_export_neutralises_formulas(db):
    tenant = services.create_tenant("Sheets", slug="sheets")
    key, _ = services.create_api_key(tenant, "+cmd|' /C calc'!A0")
    staff = services.create_user(f"staff-{uuid.uuid4().hex[:6]}", password="pw-12345678")
    staff.is_staff = staff.is_superuser = True
    staff.save()
    prompts = ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(A1:A9)", "\tx=1", "\rx=1", "a = b"]
    ids = []
    for prompt in prompts:
        data = inference_services.check_input(prompt="placeholder", images=[media.png(20, 10)])
        query = inference_services.accept(key, data, endpoint=Query.Endpoint.QUERIES)
        # as stored (the input check strips leading blanks), with tokens counted
        Query.objects.filter(pk=query.pk).update(prompt=prompt, prompt_tokens=12)
        ids.append(query.pk)
    client = Client()
    client.force_login(staff)
    exported = client.post("/admin/inference/query/", {"action": "export_csv", "_selected_action": ids})
    assert exported.status_code == 200 and exported["Content-Type"] == "text/csv"
    rows = list(csv.DictReader(io.StringIO(b"".join(exported.streaming_content).decode(), newline="")))
    assert sorted(row["prompt"] for row in rows) == sorted(
        ["'" + p for p in prompts[:-1]] + ["a = b"]  # only a leading character makes a formula
    )
    assert {row["api_key"] for row in rows} == {"'+cmd|' /C calc'!A0"}
    assert all(re.fullmatch(r"\d+", row["prompt_tokens"]) for row in rows)  # numbers stay numbers


def test_passwords_are_hashed_with_pbkdf2_unless_the_test_flag_is_set():
    """The suite's fast hasher (tests/conftest.py) never reaches a deployment: without the loud
    test-only flag, settings keep Django's PBKDF2 first."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "INSECURE_FAST_PASSWORD_HASHING_FOR_TESTS"}
    code = "import django; django.setup(); from django.conf import settings; print(settings.PASSWORD_HASHERS[0])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "DJANGO_SETTINGS_MODULE": "config.settings"},
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert out == "django.contrib.auth.hashers.PBKDF2PasswordHasher", out
