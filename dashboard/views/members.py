"""Members: the tenant's members and their roles, invitation links, and the activity log (who
changed what, when). Owners invite, revoke invitations, change roles and remove members; admins
and members read. The invitation page itself needs no sign-in: the link is the credential."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from accounts import dashboard, services
from accounts.forms import InvitationForm, InviteeForm, RoleForm
from accounts.models import Invitation, Membership
from dashboard.views.common import page_context, require_owner

OWNERS_DO = "invite, change roles and remove members"


def _page(request, membership, *, status=200, error=None, invitation_form=None, invitation_link=None):
    tenant = membership.tenant
    is_owner = membership.role == Membership.Role.OWNER
    members = tenant.memberships.select_related("user").order_by("user__username")
    pending = [i for i in tenant.invitations.select_related("created_by").filter(accepted_at=None, revoked_at=None)]
    context = page_context(
        request,
        membership,
        is_owner=is_owner,
        members=[{"membership": m, "form": RoleForm(initial={"role": m.role}, prefix=f"m{m.pk}")} for m in members],
        invitations=[i for i in pending if i.state() == "pending"] if is_owner else [],
        invitation_form=invitation_form or InvitationForm(),
        invitation_link=invitation_link,
        events=services.activity(tenant=tenant),
        error=error,
        ttl_hours=settings.INVITATION_TTL_HOURS,
    )
    return render(request, "dashboard/members.html", context, status=status)


@login_required
def member_list(request):
    return _page(request, dashboard.current_membership(request))


@login_required
@require_POST
def invitation_create(request):
    membership = dashboard.current_membership(request)
    require_owner(membership, doing=OWNERS_DO)
    form = InvitationForm(request.POST)
    if not form.is_valid():
        return _page(request, membership, status=400, invitation_form=form)
    _, token = services.create_invitation(
        tenant=membership.tenant, role=form.cleaned_data["role"], created_by=request.user
    )
    link = request.build_absolute_uri(reverse("dashboard:invitation", args=[token]))
    return _page(request, membership, status=201, invitation_link=link)


@login_required
@require_POST
def invitation_revoke(request, invitation_id):
    membership = dashboard.current_membership(request)
    require_owner(membership, doing=OWNERS_DO)
    invitation = dashboard.tenant_invitation(membership, invitation_id)
    try:
        services.revoke_invitation(invitation=invitation, actor=request.user)
    except services.MemberChangeRefused as refused:
        return _page(request, membership, status=refused.status, error=refused)
    messages.success(request, "Invitation revoked: its link no longer works.")
    return redirect("dashboard:members")


@login_required
@require_POST
def member_role(request, member_id):
    membership = dashboard.current_membership(request)
    require_owner(membership, doing=OWNERS_DO)
    target = dashboard.tenant_membership(membership, member_id)
    form = RoleForm(request.POST, prefix=f"m{target.pk}")
    if not form.is_valid():
        refused = services.MemberChangeRefused("invalid_role", "Choose owner, admin or member.", status=400)
        return _page(request, membership, status=400, error=refused)
    try:
        services.change_role(membership=target, role=form.cleaned_data["role"], actor=request.user)
    except services.MemberChangeRefused as refused:
        return _page(request, membership, status=refused.status, error=refused)
    messages.success(request, f"{target.user.get_username()} is now {form.cleaned_data['role']}.")
    return redirect("dashboard:members")


@login_required
@require_POST
def member_remove(request, member_id):
    membership = dashboard.current_membership(request)
    require_owner(membership, doing=OWNERS_DO)
    target = dashboard.tenant_membership(membership, member_id)
    try:
        services.remove_member(membership=target, actor=request.user)
    except services.MemberChangeRefused as refused:
        return _page(request, membership, status=refused.status, error=refused)
    messages.success(request, f"Removed {target.user.get_username()} from {membership.tenant.name}.")
    if target.user_id == request.user.pk:  # an owner who removed themselves looks at another tenant now
        request.session.pop(dashboard.SESSION_TENANT, None)
        return redirect("dashboard:overview")
    return redirect("dashboard:members")


def invitation(request, token):
    """The link an invitee opens: choose a username and a password (or, signed in, join with this
    account), then land signed in on the dashboard. An expired, used or revoked link says so (410);
    an unknown one 404."""
    try:
        invitation = services.usable_invitation(token=token)
    except services.MemberChangeRefused as refused:
        return _invitation_gone(request, refused)
    form = InviteeForm()
    if request.method == "POST":
        join = request.POST.get("action") == "join" and request.user.is_authenticated
        if not join:
            form = InviteeForm(request.POST)
        if join or form.is_valid():
            try:
                if join:
                    accepted = services.accept_invitation(token=token, user=request.user)
                else:
                    accepted = services.accept_invitation(
                        token=token, username=form.cleaned_data["username"], password=form.cleaned_data["password1"]
                    )
            except services.MemberChangeRefused as refused:
                if refused.status in (404, 410):
                    return _invitation_gone(request, refused)
                return _invitation_page(request, invitation, form, status=refused.status, error=refused)
            if not join:
                login(request, accepted.user, backend="django.contrib.auth.backends.ModelBackend")
            dashboard.switch_tenant(request, accepted.tenant_id)
            messages.success(request, f"Welcome to {accepted.tenant.name}: you are {accepted.role}.")
            return redirect("dashboard:overview")
        return _invitation_page(request, invitation, form, status=400)
    return _invitation_page(request, invitation, form)


def _invitation_page(request, invitation: Invitation, form, *, status=200, error=None):
    context = {"invitation": invitation, "form": form, "error": error}
    return render(request, "dashboard/invitation.html", context, status=status)


def _invitation_gone(request, refused):
    return render(request, "dashboard/invitation_gone.html", {"error": refused}, status=refused.status)
