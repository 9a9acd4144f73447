from django import forms
from django.contrib.auth.forms import UserCreationForm

from accounts.models import ApiKey, Membership, Tenant

QUOTA_FIELDS = ["requests_per_minute", "requests_per_day", "tokens_per_month", "max_concurrent_requests"]


class KeyForm(forms.ModelForm):
    """A key's name and its quota overrides (blank = the tenant's default)."""

    class Meta:
        model = ApiKey
        fields = ["name", *QUOTA_FIELDS]

    def __init__(self, *args, tenant, **kwargs):
        super().__init__(*args, **kwargs)
        self.tenant = tenant
        for name in QUOTA_FIELDS:
            limit = getattr(tenant, name)
            self.fields[name].help_text = f"tenant limit: {'unlimited' if limit is None else limit}"

    def clean(self):
        from accounts.dashboard import check_overrides

        cleaned = super().clean()
        for name, message in check_overrides(self.tenant, {n: cleaned.get(n) for n in QUOTA_FIELDS}).items():
            self.add_error(name, message)
        return cleaned


class PrivacyForm(forms.ModelForm):
    """What the tenant keeps of its queries, and for how long (owners)."""

    class Meta:
        model = Tenant
        fields = ["privacy_mode", "content_retention_days", "image_retention_days"]
        widgets = {"privacy_mode": forms.RadioSelect}
        labels = {
            "privacy_mode": "Privacy mode",
            "content_retention_days": "Keep prompts and answers for (days)",
            "image_retention_days": "Keep images for (days)",
        }


class InvitationForm(forms.Form):
    """The role an invitation link gives (owners)."""

    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER, label="Role")


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Membership.Role.choices, label="Role")


class InviteeForm(UserCreationForm):
    """The account an invitee creates through the link: a free username and a password that passes
    Django's password validators (AUTH_PASSWORD_VALIDATORS). Only checks: accounts.services creates."""
