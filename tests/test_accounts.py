"""Tenants and API keys: the key format, hashing, and every way a key is refused."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from accounts import keys, services
from accounts.models import ApiKey
from inference.models import Query

pytestmark = pytest.mark.django_db


def test_key_format_and_only_the_hash_is_stored(tenant):
    api_key, plaintext = services.create_api_key(tenant, "k")
    assert keys.KEY_RE.match(plaintext)
    assert plaintext.startswith(f"sl_{api_key.prefix}_")
    stored = ApiKey.objects.get(pk=api_key.pk)
    assert stored.key_hash == keys.hash_key(plaintext)
    # The secret part appears in no column.
    secret = plaintext.rsplit("_", 1)[1]
    assert all(secret not in str(value) for value in stored.__dict__.values())


def test_authenticate_good_key_sets_last_used(tenant):
    api_key, plaintext = services.create_api_key(tenant, "k")
    assert services.authenticate_key(plaintext).pk == api_key.pk
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at is not None


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"HTTP_AUTHORIZATION": "Bearer sl_AAAAAAAA_" + "B" * 32},
        {"HTTP_AUTHORIZATION": "Bearer not-a-key"},
        {"HTTP_AUTHORIZATION": "Basic dXNlcjpwYXNz"},
        {"HTTP_X_API_KEY": "sl_AAAAAAAA_" + "B" * 32},
    ],
    ids=["missing", "unknown", "malformed", "wrong-scheme", "unknown-x-api-key"],
)
def test_missing_or_wrong_key_is_401_and_nothing_runs(api_client, api_key, png_bytes, headers):
    response = api_client.post("/v1/glm/infer", {"prompt": "hi", "image": png_bytes.hex()}, format="json", **headers)
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert response.json()["msg"]
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert Query.objects.count() == 0


def test_right_prefix_wrong_secret_is_401(api_client, api_key):
    row, plaintext = api_key
    forged = f"sl_{row.prefix}_{'x' * 32}"
    response = api_client.post("/v1/glm/infer", {}, format="json", HTTP_AUTHORIZATION=f"Bearer {forged}")
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"


def test_revoked_key_is_refused_with_key_revoked(api_client, api_key):
    row, plaintext = api_key
    services.revoke_api_key(row)
    response = api_client.post("/v1/glm/infer", {}, format="json", HTTP_X_API_KEY=plaintext)
    assert response.status_code == 401
    assert response.json()["code"] == "key_revoked"
    assert Query.objects.count() == 0


def test_expired_key_is_refused_with_key_expired(api_client, tenant):
    _, plaintext = services.create_api_key(tenant, "old", expires_at=timezone.now() - timedelta(seconds=1))
    response = api_client.post("/v1/glm/infer", {}, format="json", HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    assert response.status_code == 401
    assert response.json()["code"] == "key_expired"
    assert Query.objects.count() == 0


def test_management_commands_create_tenant_and_print_key_once(capsys):
    call_command("create_tenant", "Globex", "--rpm", "5")
    slug = capsys.readouterr().out.strip()
    assert slug == "globex"
    call_command("create_api_key", "globex", "--name", "ci")
    plaintext = capsys.readouterr().out.strip()
    assert services.authenticate_key(plaintext).tenant.slug == "globex"
    assert services.authenticate_key(plaintext).tenant.requests_per_minute == 5
