from django import forms

from accounts.models import ApiKey

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
