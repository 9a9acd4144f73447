"""Business rules for tenants, memberships and API keys."""

import json
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.text import slugify

from accounts import keys
from accounts.models import ApiKey, AuditEvent, Invitation, Membership, Tenant
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
    """Create a key. Returns the row and the plaintext key, which is never stored and shown only now."""
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
    record(
        tenant=tenant,
        actor=created_by,
        action=AuditEvent.Action.KEY_CREATED,
        target=_key_target(api_key),
        details={name: value for name, value in quota_overrides.items() if value is not None},
    )
    return api_key, new.plaintext


def revoke_api_key(api_key: ApiKey, *, actor=None) -> ApiKey:
    with transaction.atomic():
        revoked = ApiKey.objects.filter(pk=api_key.pk, revoked_at=None).update(revoked_at=timezone.now())
        if revoked:
            record(
                tenant=api_key.tenant, actor=actor, action=AuditEvent.Action.KEY_REVOKED, target=_key_target(api_key)
            )
    api_key.refresh_from_db(fields=["revoked_at"])
    return api_key


@transaction.atomic
def edit_api_key(*, api_key: ApiKey, actor, changes: dict) -> ApiKey:
    """Set a key's name or quota overrides (already checked: accounts.forms.KeyForm) and record
    what changed, from what to what."""
    before = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    changed = {}
    for name, value in changes.items():
        if getattr(before, name) != value:
            changed[name] = [getattr(before, name), value]
            setattr(before, name, value)
    if changed:
        before.save(update_fields=list(changed))
        record(
            tenant=before.tenant,
            actor=actor,
            action=AuditEvent.Action.KEY_EDITED,
            target=_key_target(before),
            details=changed,
        )
    return before


def _key_target(api_key: ApiKey) -> str:
    return f"key {api_key.name} (sl_{api_key.prefix}_…)"[:200]


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


# --- the activity log -----------------------------------------------------------------------------


def record(*, tenant: Tenant, actor, action: str, target: str, details: dict | None = None) -> AuditEvent:
    """Write one audit event (``actor`` None: the platform itself, e.g. a management command)."""
    user = actor if actor is not None and getattr(actor, "is_authenticated", False) else None
    return AuditEvent.objects.create(
        tenant=tenant,
        actor=user,
        actor_name=user.get_username() if user is not None else "",
        action=action,
        target=target[:200],
        details=json.loads(json.dumps(details or {}, cls=DjangoJSONEncoder)),  # dates as ISO 8601 text
    )


def activity(*, tenant: Tenant, limit: int = 50):
    """The tenant's most recent audit events, newest first."""
    return AuditEvent.objects.filter(tenant=tenant).order_by("-created_at", "-id")[:limit]


# --- invitations and members ------------------------------------------------------------------------


class MemberChangeRefused(Exception):
    """A member or invitation change that may not be made; ``code`` is stable, ``status`` the HTTP
    status the dashboard answers with, ``message`` says why in words."""

    def __init__(self, code: str, message: str, *, status: int):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


INVITATION_REFUSALS = {
    "expired": ("invitation_expired", "This invitation link has expired. Ask an owner of the team for a new one."),
    "accepted": ("invitation_used", "This invitation link has been used already; each link works once."),
    "revoked": ("invitation_revoked", "This invitation link was revoked by an owner of the team."),
}


def create_invitation(*, tenant: Tenant, role: str, created_by) -> tuple[Invitation, str]:
    """A one-time invitation link's row and its token (never stored: shown once, at creation)."""
    if role not in Membership.Role.values:
        raise MemberChangeRefused(
            "invalid_role", f"The role must be one of {', '.join(Membership.Role.values)}.", status=400
        )
    token = keys.generate_token()
    with transaction.atomic():
        invitation = Invitation.objects.create(
            tenant=tenant,
            role=role,
            token_hash=keys.hash_key(token),
            created_by=created_by,
            expires_at=timezone.now() + timedelta(hours=settings.INVITATION_TTL_HOURS),
        )
        record(
            tenant=tenant,
            actor=created_by,
            action=AuditEvent.Action.INVITATION_CREATED,
            target=_invitation_target(invitation),
            details={"role": role, "expires_at": invitation.expires_at.isoformat()},
        )
    return invitation, token


def revoke_invitation(*, invitation: Invitation, actor) -> Invitation:
    with transaction.atomic():
        locked = Invitation.objects.select_for_update().get(pk=invitation.pk)
        state = locked.state()
        if state != "pending":
            raise MemberChangeRefused(
                "invitation_not_pending",
                f"This invitation is {state} already; only a pending one can be revoked.",
                status=409,
            )
        locked.revoked_at = timezone.now()
        locked.save(update_fields=["revoked_at"])
        record(
            tenant=locked.tenant,
            actor=actor,
            action=AuditEvent.Action.INVITATION_REVOKED,
            target=_invitation_target(locked),
        )
    return locked


def usable_invitation(*, token: str, lock: bool = False) -> Invitation:
    """The pending invitation of ``token``, or ``MemberChangeRefused`` saying plainly why not:
    404 for a token that never existed, 410 for one expired, used or revoked."""
    rows = Invitation.objects.select_related("tenant")
    if lock:
        rows = rows.select_for_update(of=("self",))
    invitation = rows.filter(token_hash=keys.hash_key(token or "")).first() if token else None
    if invitation is None or not invitation.tenant.is_active:
        raise MemberChangeRefused(
            "invitation_not_found", "This invitation link is not valid. Check that it was copied whole.", status=404
        )
    state = invitation.state()
    if state != "pending":
        code, message = INVITATION_REFUSALS[state]
        raise MemberChangeRefused(code, message, status=410)
    return invitation


def accept_invitation(*, token: str, user=None, username: str = "", password: str = "") -> Membership:
    """Use an invitation once: ``user`` (signed in already) joins the tenant, or a new user
    ``username`` with ``password`` (checked already with the password validators: the form) is
    created and joins. Raises ``MemberChangeRefused``; the link stays unused when it does."""
    with transaction.atomic():
        invitation = usable_invitation(token=token, lock=True)
        if user is None:
            try:
                with transaction.atomic():
                    user = create_user(username, password=password)
            except IntegrityError:
                raise MemberChangeRefused(
                    "username_taken", f"The username {username!r} is taken; choose another.", status=409
                ) from None
        elif Membership.objects.filter(tenant=invitation.tenant, user=user).exists():
            raise MemberChangeRefused(
                "already_member",
                f"You are a member of {invitation.tenant.name} already; this link is left unused for someone else.",
                status=409,
            )
        membership = Membership.objects.create(tenant=invitation.tenant, user=user, role=invitation.role)
        invitation.accepted_at = timezone.now()
        invitation.accepted_by = user
        invitation.save(update_fields=["accepted_at", "accepted_by"])
        record(
            tenant=invitation.tenant,
            actor=user,
            action=AuditEvent.Action.INVITATION_ACCEPTED,
            target=_invitation_target(invitation),
            details={"role": invitation.role, "username": user.get_username()},
        )
    return membership


def change_role(*, membership: Membership, role: str, actor) -> Membership:
    if role not in Membership.Role.values:
        raise MemberChangeRefused(
            "invalid_role", f"The role must be one of {', '.join(Membership.Role.values)}.", status=400
        )
    with transaction.atomic():
        locked = _lock_with_owners(membership)
        if locked.role == role:
            return locked
        if locked.role == Membership.Role.OWNER:
            _refuse_last_owner(locked, "demoted")
        before = locked.role
        locked.role = role
        locked.save(update_fields=["role"])
        record(
            tenant=locked.tenant,
            actor=actor,
            action=AuditEvent.Action.ROLE_CHANGED,
            target=f"member {locked.user.get_username()}",
            details={"from": before, "to": role},
        )
    return locked


def remove_member(*, membership: Membership, actor) -> None:
    with transaction.atomic():
        locked = _lock_with_owners(membership)
        if locked.role == Membership.Role.OWNER:
            _refuse_last_owner(locked, "removed")
        locked.delete()
        record(
            tenant=locked.tenant,
            actor=actor,
            action=AuditEvent.Action.MEMBER_REMOVED,
            target=f"member {locked.user.get_username()}",
            details={"role": locked.role},
        )


def _lock_with_owners(membership: Membership) -> Membership:
    """Lock the tenant's owner memberships and this one, so two owners demoting each other at once
    cannot leave the tenant with none."""
    owners = Membership.objects.filter(tenant_id=membership.tenant_id, role=Membership.Role.OWNER)
    list(owners.select_for_update().order_by("pk"))  # always in one order: no deadlock between two
    return Membership.objects.select_for_update().select_related("user", "tenant").get(pk=membership.pk)


def _refuse_last_owner(membership: Membership, doing: str) -> None:
    owners = Membership.objects.filter(tenant_id=membership.tenant_id, role=Membership.Role.OWNER).count()
    if owners <= 1:
        raise MemberChangeRefused(
            "last_owner",
            f"{membership.user.get_username()} is the last owner of {membership.tenant.name} and cannot be {doing}: "
            "make another member an owner first.",
            status=409,
        )


def _invitation_target(invitation: Invitation) -> str:
    return f"invitation #{invitation.pk} ({invitation.role})"
