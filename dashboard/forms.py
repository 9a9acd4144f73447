"""The dashboard's own forms: the query log's filters."""

import uuid
from datetime import UTC, date, datetime, time, timedelta

from django import forms

from inference.models import Query

ANY = [("", "any")]
INVALID_DATE = "give a date as YYYY-MM-DD (for example 2026-12-07)."


class QueryLogFilter(forms.Form):
    """What the query log's GET parameters may say. Bad input is a message on the page (400), never
    a 500 and never silently ignored. Dates are UTC days: ``date_from`` from its first moment,
    ``date_to`` up to its last (inclusive)."""

    status = forms.ChoiceField(required=False, choices=ANY + [(s, s) for s in Query.Status.values])
    endpoint = forms.ChoiceField(required=False, choices=ANY + [(e, e) for e in Query.Endpoint.values])
    model = forms.CharField(required=False, max_length=200)
    key = forms.TypedChoiceField(required=False, coerce=int, empty_value=None)
    date_from = forms.DateField(
        required=False, label="From", input_formats=["%Y-%m-%d"], error_messages={"invalid": INVALID_DATE}
    )
    date_to = forms.DateField(
        required=False, label="To", input_formats=["%Y-%m-%d"], error_messages={"invalid": INVALID_DATE}
    )
    # The keyset cursor of "Older →": the created_at and id of the previous page's last row.
    before = forms.CharField(required=False, max_length=100)

    def __init__(self, data, *, api_keys, models):
        super().__init__(data)
        self.fields["key"].choices = ANY + [(str(k.pk), k.name) for k in api_keys]
        self.fields["key"].error_messages["invalid_choice"] = "no such key in this tenant."
        self.models = list(models)

    def clean_before(self):
        raw = self.cleaned_data["before"].strip()
        if not raw:
            return None
        moment, _, query_id = raw.partition("~")
        try:
            created_at = datetime.fromisoformat(moment)
            if created_at.tzinfo is None:
                created_at = created_at.replace(tzinfo=UTC)
            return created_at, uuid.UUID(query_id) if query_id else None
        except ValueError:
            raise forms.ValidationError(
                "this page link is damaged; start again from the newest queries.", code="invalid"
            ) from None

    def clean(self):
        cleaned = super().clean()
        start, end = cleaned.get("date_from"), cleaned.get("date_to")
        if start and end and start > end:
            self.add_error("date_to", f"must be on or after the 'From' date ({start.isoformat()}).")
        return cleaned

    def problems(self) -> list[str]:
        """Each error as one sentence naming its field, for the page."""
        return [
            f"{self.fields[name].label or name.capitalize() if name != '__all__' else 'Filters'}: {message}"
            for name, messages in self.errors.items()
            for message in messages
        ]

    def log_filters(self) -> dict:
        """Keyword arguments of ``selectors.filter_log`` (call only once the form is valid)."""
        data = self.cleaned_data
        start, end = data.get("date_from"), data.get("date_to")
        return {
            "status": data.get("status") or "",
            "endpoint": data.get("endpoint") or "",
            "model": data.get("model") or "",
            "api_key_id": data.get("key"),
            "created_from": datetime.combine(start, time.min, tzinfo=UTC) if start else None,
            "created_until": (
                datetime.combine(end + timedelta(days=1), time.min, tzinfo=UTC) if end and end < date.max else None
            ),
            "before": data.get("before"),
        }


def cursor(query: Query) -> str:
    """The ``before`` value that continues the log after ``query``."""
    return f"{query.created_at.isoformat()}~{query.pk}"
