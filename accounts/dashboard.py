"""The dashboard's rules: which tenant a signed-in user is looking at, and what their role allows."""

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.http import Http404

from accounts import services
from accounts.models import ApiKey, Invitation, Membership
from config.errors import ApiError

SESSION_TENANT = "dashboard_tenant_id"
MANAGERS = (Membership.Role.OWNER, Membership.Role.ADMIN)


def memberships(user):
    return (
        Membership.objects.filter(user=user, tenant__is_active=True).select_related("tenant").order_by("tenant__name")
    )


def current_membership(request) -> Membership:
    """The membership of the tenant chosen in the session, else the user's first. 404 with none."""
    mine = memberships(request.user)
    chosen = request.session.get(SESSION_TENANT)
    membership = (mine.filter(tenant_id=chosen).first() if chosen else None) or mine.first()
    if membership is None:
        raise Http404("You are not a member of any tenant.")
    return membership


def switch_tenant(request, tenant_id) -> Membership:
    membership = memberships(request.user).filter(tenant_id=tenant_id).first()
    if membership is None:
        raise Http404("No such tenant.")
    request.session[SESSION_TENANT] = membership.tenant_id
    return membership


def require_manager(membership: Membership) -> None:
    if membership.role not in MANAGERS:
        raise PermissionDenied("Only the tenant's owners and admins manage keys.")


def tenant_key(membership: Membership, key_id) -> ApiKey:
    api_key = ApiKey.objects.filter(tenant=membership.tenant, pk=key_id).first()
    if api_key is None:
        raise Http404("No such key.")
    return api_key


def tenant_membership(membership: Membership, member_id) -> Membership:
    """A membership of the tenant ``membership`` is looking at; 404 for any other."""
    found = Membership.objects.select_related("user", "tenant").filter(tenant=membership.tenant, pk=member_id).first()
    if found is None:
        raise Http404("No such member.")
    return found


def tenant_invitation(membership: Membership, invitation_id) -> Invitation:
    found = Invitation.objects.select_related("tenant").filter(tenant=membership.tenant, pk=invitation_id).first()
    if found is None:
        raise Http404("No such invitation.")
    return found


def check_overrides(tenant, overrides: dict) -> dict:
    """Key quota overrides may only tighten the tenant's own limits."""
    errors = {}
    for name, value in overrides.items():
        ceiling = getattr(tenant, name)
        if value is not None and ceiling is not None and value > ceiling:
            errors[name] = f"at most {ceiling} (the tenant's limit)"
    return errors


def playground_key(membership: Membership, user) -> ApiKey:
    """The key the playground's queries run under (one per user and tenant), so they are logged,
    counted and limited like any other. Its secret is random and never shown: the playground
    authenticates with the dashboard session."""
    name = f"playground: {user.get_username()}"[:100]
    api_key = ApiKey.objects.filter(tenant=membership.tenant, name=name, created_by=user, revoked_at=None).first()
    if api_key is None:
        api_key, _ = services.create_api_key(membership.tenant, name, created_by=user)
    return api_key


def session_api_key(user, session) -> ApiKey | None:
    """For the websocket: the playground key of a signed-in dashboard user's current tenant."""
    if user is None or not user.is_authenticated:
        return None
    mine = memberships(user)
    chosen = session.get(SESSION_TENANT) if session is not None else None
    membership = (mine.filter(tenant_id=chosen).first() if chosen else None) or mine.first()
    if membership is None:
        return None
    return ApiKey.objects.select_related("tenant").get(pk=playground_key(membership, user).pk)


def recheck_session_key(user, api_key_id) -> ApiKey:
    """For the websocket, on every query: the playground key reloaded, if its user is still an
    active member of the key's (active) tenant and the key itself may still be used. Raises
    ``ApiError`` (``forbidden``, or the key's own refusal)."""
    active = get_user_model().objects.filter(pk=user.pk, is_active=True).exists()
    api_key = services.recheck_key(api_key_id)
    if not active or not memberships(user).filter(tenant_id=api_key.tenant_id).exists():
        raise ApiError("forbidden", "You are no longer a member of this tenant; reload the dashboard.")
    return api_key
