"""Business rules for tenants, memberships and API keys."""

from datetime import datetime, timedelta

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from accounts import keys
from accounts.models import ApiKey, Membership, Tenant, budget_error
from config.errors import ApiError

# last_used_at is refreshed at most this often, so a busy key does not write on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def create_tenant(name: str, slug: str | None = None, **quotas) -> Tenant:
    return Tenant.objects.create(name=name, slug=slug or slugify(name)[:64], **quotas)


def add_member(tenant: Tenant, user, role: str = Membership.Role.MEMBER) -> Membership:
    membership, _ = Membership.objects.update_or_create(user=user, tenant=tenant, defaults={"role": role})
    return membership


def create_user(username: str, password: str | None = None, email: str = ""):
    User = get_user_model()
    user = User.objects.create_user(username=username, email=email, password=password)
    return user


@transaction.atomic
def create_api_key(
    tenant: Tenant, name: str, *, created_by=None, expires_at: datetime | None = None, **quota_overrides
) -> tuple[ApiKey, str]:
    """Create a key. Returns the row and the plaintext key, which is never stored and shown only now.
    A ``monthly_budget`` above the tenant's is refused (ValidationError naming the field)."""
    message = budget_error(tenant_budget=tenant.monthly_budget, key_budget=quota_overrides.get("monthly_budget"))
    if message:
        raise ValidationError({"monthly_budget": message})
    for _ in range(5):
        new = keys.generate()
        if not ApiKey.objects.filter(prefix=new.prefix).exists():
            break
    else:  # 62**8 prefixes; five collisions in a row means something else is wrong
        raise RuntimeError("could not find a free key prefix")
    api_key = ApiKey.objects.create(
        tenant=tenant,
        name=name,
        prefix=new.prefix,
        key_hash=new.key_hash,
        created_by=created_by,
        expires_at=expires_at,
        **quota_overrides,
    )
    return api_key, new.plaintext


def revoke_api_key(api_key: ApiKey) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def authenticate_key(plaintext: str) -> ApiKey:
    """Look a key up by its public prefix and compare the hash in constant time.

    Raises ``ApiError`` (``unauthorized``, ``key_revoked`` or ``key_expired``) when it cannot be used.
    """
    plaintext = plaintext.strip()
    prefix = keys.parse_prefix(plaintext)
    if prefix is None:
        raise ApiError("unauthorized", "The API key is malformed; keys look like 'sl_XXXXXXXX_<32 characters>'.")
    api_key = ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()
    if api_key is None or not keys.matches(plaintext, api_key.key_hash):
        raise ApiError("unauthorized", "The API key is not valid. Check it, or create a new one.")
    now = timezone.now()
    check_key_usable(api_key, now)
    if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
        ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now
    return api_key


def check_key_usable(api_key: ApiKey, now: datetime | None = None) -> None:
    """Raise ``ApiError`` (``key_revoked``, ``key_expired`` or ``forbidden``) if the key may not be used now."""
    now = now or timezone.now()
    if api_key.is_revoked:
        raise ApiError("key_revoked", "This API key has been revoked. Create a new key to continue.")
    if api_key.is_expired(now):
        raise ApiError("key_expired", f"This API key expired at {api_key.expires_at.isoformat()}. Create a new key.")
    if not api_key.tenant.is_active:
        raise ApiError("forbidden", "This key's tenant is disabled. Contact the platform's operators.")


def recheck_key(api_key_id) -> ApiKey:
    """The key reloaded from the database, if it may still be used: a long-lived connection (the
    websocket) authenticated once, and a key revoked, expired or disabled since must stop working
    at its next request. Raises like ``authenticate_key``."""
    api_key = ApiKey.objects.select_related("tenant").filter(pk=api_key_id).first()
    if api_key is None:
        raise ApiError("key_revoked", "This API key no longer exists. Create a new key to continue.")
    check_key_usable(api_key)
    return api_key


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key carried by ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, if any."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        raise ApiError("unauthorized", "The Authorization header must be 'Bearer <key>'.")
    return None
