import csv
import uuid
from datetime import datetime, timedelta

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db import models
from django.db.models import Max, Min
from django.http import HttpResponseRedirect, StreamingHttpResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join

from config import request_id as request_ids
from config.admin_widgets import FORMFIELD_OVERRIDES
from inference import chat, pricing, privacy, selectors
from inference.models import ModelPrice, Query, UsageDaily
from inference.services import served_models

# The query log may hold millions of rows. Nothing on its admin list may scan them all: counts stop
# at COUNT_CAP, no facet counts, the model filter lists the served models (not SELECT DISTINCT),
# and the date hierarchy reads only the first and last row of the filtered list (index lookups).
COUNT_CAP = 10_000


class _Echo:
    def write(self, value):
        return value


# A spreadsheet reads a cell that begins with one of these as a formula (OWASP "CSV injection"): a
# prompt like "=HYPERLINK(...)" would run when an operator opens the export. A leading single
# quote makes it text; the cell shows the value unchanged.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value):
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


# The query list's columns; the CSV export adds what a spreadsheet wants besides.
COLUMNS = [
    "created_at",
    "tenant",
    "api_key",
    "model",
    "endpoint",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cost",
]
# image_sha256: the SHA-256 of each image, in order, separated by spaces ("" for a text-only query).
# privacy_mode and not_kept say what is not kept (the prompt is then empty): privacy mode, retention.
CSV_FIELDS = [
    "id",
    *COLUMNS,
    "total_seconds",
    "error_code",
    "images",
    "image_sha256",
    "privacy_mode",
    "not_kept",
    "prompt",
]


# What a query's page leaves out when its content is not kept (privacy mode, retention).
CONTENT_FIELDS = (
    "prompt",
    "messages",
    "answer",
    "reasoning",
    "tool_calls",
    "choices",
    "params",
    "client_ip",
    "user_agent",
)


class CappedCountPaginator(Paginator):
    """Counts at most COUNT_CAP + 1 rows: `capped` says the list holds more than `count` shows."""

    @cached_property
    def count(self):
        # Unordered: a count needs no ORDER BY, which would make PostgreSQL walk the created_at
        # index to find the first COUNT_CAP matches of a filter.
        counted = self.object_list.order_by()[: COUNT_CAP + 1].count()
        self.capped = counted > COUNT_CAP
        return min(counted, COUNT_CAP)

    capped = False


class CalendarQuerySet(models.QuerySet):
    """The admin's query list. Django's date hierarchy asks for the distinct years, months or days
    that hold rows (a scan of every matching row); this answers with the calendar between the
    first and last matching rows instead, found through the created_at indexes. A day with no
    queries may be offered; following it shows an empty list."""

    def datetimes(self, field_name, kind, order="ASC", tzinfo=None):
        bounds = self.order_by().aggregate(first=Min(field_name), last=Max(field_name))
        if bounds["first"] is None:
            return []
        first, last = (timezone.localtime(v) for v in (bounds["first"], bounds["last"]))
        tz = timezone.get_current_timezone()
        if kind == "year":
            return [datetime(y, 1, 1, tzinfo=tz) for y in range(first.year, last.year + 1)]
        if kind == "month":
            return [datetime(first.year, m, 1, tzinfo=tz) for m in range(first.month, last.month + 1)]
        if kind == "day":
            return [datetime(first.year, first.month, d, tzinfo=tz) for d in range(first.day, last.day + 1)]
        raise ValueError(f"unsupported kind {kind!r}")


def _picked_period(request):
    """[start, end) of the year, month or day picked in the query list's date hierarchy, or None."""
    try:
        year = int(request.GET["created_at__year"])
        month = int(request.GET.get("created_at__month") or 0)
        day = int(request.GET.get("created_at__day") or 0)
        start = datetime(year, month or 1, day or 1)
    except (KeyError, ValueError, OverflowError):
        return None
    if day:
        end = start + timedelta(days=1)
    elif month:
        end = datetime(year + (month == 12), month % 12 + 1, 1)
    else:
        end = datetime(year + 1, 1, 1)
    zone = timezone.get_current_timezone()
    return timezone.make_aware(start, zone), timezone.make_aware(end, zone)


class SearchedQuerySet(CalendarQuerySet):
    """The admin's query list once a prompt search narrowed it. The date hierarchy asks for the
    first and last matching rows (MIN/MAX of created_at): PostgreSQL answers those by walking the
    created_at index from each end until a row matches, through every row that does not — most
    of the log for a rare term (hundreds of ms at 10 M rows). A searched list's calendar spans the
    whole log instead (two index lookups); a day with no match may be offered, as above."""

    def aggregate(self, *args, **kwargs):
        if not args and kwargs and all(isinstance(value, Min | Max) for value in kwargs.values()):
            return self.model._default_manager.order_by().aggregate(**kwargs)
        return super().aggregate(*args, **kwargs)


class ModelFilter(admin.SimpleListFilter):
    """The served models (settings), not a SELECT DISTINCT over the query log."""

    title = "model"
    parameter_name = "model"

    def lookups(self, request, model_admin):
        return [(m, m) for m in served_models()]

    def queryset(self, request, queryset):
        return queryset.filter(model=self.value()) if self.value() else queryset


@admin.register(Query)
class QueryAdmin(admin.ModelAdmin):
    """The query log, read-only. Filter, search, look at one, or export a filtered list as CSV."""

    list_display = ["short_id", *COLUMNS, "latency"]
    list_filter = ["status", "endpoint", ModelFilter, "tenant", "created_at"]
    search_fields = ["=id", "prompt"]
    date_hierarchy = "created_at"
    list_select_related = ["tenant", "api_key"]
    paginator = CappedCountPaginator
    list_per_page = 50  # rendering rows is most of the page's time
    show_full_result_count = False  # no second, unfiltered COUNT(*) on every page
    show_facets = admin.ShowFacets.NEVER  # "show counts" would count every filter's choices
    actions = ["export_csv"]
    exclude = ["params"]

    def get_queryset(self, request):
        queryset = super().get_queryset(request).defer("answer", "params", "messages")
        queryset.__class__ = CalendarQuerySet
        return queryset

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in Query._meta.fields] + [
            "kept_note",
            "conversation",
            "images_preview",
            "params",
            "latency",
            "answer",
        ]

    def get_fields(self, request, obj=None):
        fields = super().get_fields(request, obj)
        if obj is not None and not privacy.content_shown(obj):  # not kept: the page never shows it
            fields = [f for f in fields if f not in CONTENT_FIELDS]
        return fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_search_results(self, request, queryset, search_term):
        # A query id finds that query through the primary key, a request id (X-Request-ID, from a
        # log line or a client's report) the queries of that request through its index; any other
        # text searches the prompts (a trigram index on PostgreSQL, migration 0005). Django's own
        # `=id` search would compare the id as text and read every row.
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(pk=uuid.UUID(term)), False
        except ValueError:
            pass
        if request_ids.VALID.fullmatch(term) and queryset.filter(request_id=term).exists():
            return queryset.filter(request_id=term), False
        searched = queryset.filter(prompt__icontains=term)
        start = self._prompt_search_start(request)
        if start is not None:
            searched = searched.filter(created_at__gte=start)
            self.message_user(
                request,
                f"The prompt search read the newest {settings.ADMIN_PROMPT_SEARCH_ROWS:,} queries"
                f"{' of the period picked' if _picked_period(request) else ''} (since "
                f"{timezone.localtime(start):%Y-%m-%d %H:%M}). Pick a year, month or day in the calendar "
                "to search older ones.",
                messages.INFO,
            )
        searched.__class__ = SearchedQuerySet
        return searched, False

    def _prompt_search_start(self, request):
        """The created_at of the ADMIN_PROMPT_SEARCH_ROWS-th newest query of the log (of the period
        picked in the date hierarchy), None when there are fewer. A prompt search reads the rows
        from there on, through the created_at index: a bounded read at any size of the log (a
        trigram index's scan grows with the log: migration 0015)."""
        window = Query.objects.order_by("-created_at")
        period = _picked_period(request)
        if period:
            window = window.filter(created_at__gte=period[0], created_at__lt=period[1])
        rows = settings.ADMIN_PROMPT_SEARCH_ROWS
        return next(iter(window.values_list("created_at", flat=True)[rows - 1 : rows]), None)

    @admin.display(description="id", ordering="id")
    def short_id(self, obj):
        return format_html('<span title="{}">{}…</span>', obj.pk, str(obj.pk)[:8])

    @admin.display(description="latency (s)")
    def latency(self, obj):
        return None if obj.total_seconds is None else round(obj.total_seconds, 3)

    @admin.display(description="kept")
    def kept_note(self, obj):
        return privacy.kept(obj)["note"]

    @admin.display(description="conversation")
    def conversation(self, obj):
        if not privacy.content_shown(obj):
            return "Not kept: " + privacy.kept(obj)["note"]
        turns = chat.turns(obj.messages)
        if not turns:
            return "-"
        return format_html(
            '<ol class="conversation">{}</ol>',
            format_html_join("", "<li><em>{}</em>: {}</li>", ((t["role"], t["text"]) for t in turns)),
        )

    @admin.display(description="images")
    def images_preview(self, obj):
        """Every image of the query, in order, with what was sent (format, size, SHA-256)."""
        images = list(obj.images.only(*selectors.IMAGE_FIELDS).order_by("position"))
        if not images:
            return "None (a text-only query)"
        shown = privacy.images_shown(obj)

        def picture(image):
            if shown and image.is_kept:
                return format_html(
                    '<img src="{}" alt="image {} of the query" style="max-width:448px">',
                    reverse("admin-query-image-at", args=[obj.pk, image.position]),
                    image.position,
                )
            return format_html('<p class="not-kept">The image is not kept: {}</p>', privacy.kept(obj)["note"])

        return format_html_join(
            "",
            '<figure class="query-image" data-position="{}" style="margin:0 0 1em">{}'
            "<figcaption>#{} · {} {}×{} · {} bytes · sha256 <code>{}</code></figcaption></figure>",
            (
                (
                    image.position,
                    picture(image),
                    image.position,
                    image.format,
                    image.width,
                    image.height,
                    image.size_bytes,
                    image.sha256,
                )
                for image in images
            ),
        )

    @admin.action(description="Export the selected queries as CSV")
    def export_csv(self, request, queryset):
        return export_csv(queryset)


def export_csv(queryset) -> StreamingHttpResponse:
    writer = csv.writer(_Echo())

    def rows():
        yield writer.writerow(CSV_FIELDS)
        queries = selectors.with_images(queryset.select_related("tenant", "api_key").defer("answer", "messages"))
        for q in queries.iterator(chunk_size=2000):
            images = list(q.images.all())
            kept = privacy.kept(q)
            cells = [
                q.pk,
                q.created_at.isoformat(),
                q.tenant.slug,
                q.api_key.name if q.api_key else "",
                q.model,
                q.endpoint,
                q.status,
                q.prompt_tokens,
                q.completion_tokens,
                q.cost,
                q.total_seconds,
                q.error_code,
                len(images),
                " ".join(image.sha256 for image in images),
                q.privacy_mode,
                kept["note"] if kept["not_kept"] else "",
                q.prompt if privacy.content_shown(q) else "",
            ]
            yield writer.writerow([_csv_cell(cell) for cell in cells])

    response = StreamingHttpResponse(rows(), content_type="text/csv")
    response["Content-Disposition"] = 'attachment; filename="queries.csv"'
    return response


@admin.register(UsageDaily)
class UsageDailyAdmin(admin.ModelAdmin):
    list_display = [
        "date",
        "tenant",
        "api_key",
        "model",
        "endpoint",
        "requests",
        "succeeded",
        "failed",
        "rejected",
        "prompt_tokens",
        "completion_tokens",
        "spend",
    ]
    list_filter = ["tenant", "date", "endpoint"]
    date_hierarchy = "date"
    list_select_related = ["tenant", "api_key"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class ModelPriceForm(forms.ModelForm):
    class Meta:
        model = ModelPrice
        fields = ["model", "input_per_million", "output_per_million", "per_image", "effective_from"]

    def clean_effective_from(self):
        # A price applies from now on, never to queries already taken: history is never rewritten.
        # (A minute's grace for the time the form took to fill in: it then applies from its saving.)
        value = self.cleaned_data["effective_from"]
        if value is not None and value < timezone.now() - timedelta(minutes=1):
            raise forms.ValidationError(
                "A price may not start in the past: queries already taken keep the price they were "
                "taken under. Choose now or a later date."
            )
        return value


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """Prices per model, with their history. Staff add a row that applies from its effective date on
    (now by default, or later); a row already in effect is never edited or deleted (the queries
    priced by it keep their cost). A model without any row costs nothing ("no price set")."""

    form = ModelPriceForm
    formfield_overrides = FORMFIELD_OVERRIDES  # the date and time inputs of effective_from labelled
    list_display = [
        "model",
        "input_per_million",
        "output_per_million",
        "per_image",
        "currency",
        "effective_from",
        "state",
        "created_by",
        "created_at",
    ]
    list_filter = ["model"]
    ordering = ["model", "-effective_from"]
    readonly_fields = ["created_by", "created_at"]

    @admin.display(description="currency")
    def currency(self, obj):
        return settings.CURRENCY

    @admin.display(description="state")
    def state(self, obj):
        now = timezone.now()
        if not obj.in_effect(now):
            return "scheduled"
        current = pricing.row_at(obj.model, now)
        return "in effect" if current is not None and current.pk == obj.pk else "superseded"

    def changelist_view(self, request, extra_context=None):
        # Say which served models have no price at all: they cost nothing.
        priced = set(ModelPrice.objects.values_list("model", flat=True).distinct())
        unpriced = [name for name in served_models() if name not in priced]
        if unpriced:
            self.message_user(
                request,
                f"No price set for {', '.join(unpriced)}: its queries cost 0 {settings.CURRENCY}.",
                messages.WARNING,
            )
        return super().changelist_view(request, extra_context)

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        if "model" in form.base_fields:
            form.base_fields["model"].help_text = "a served model's public name: " + ", ".join(served_models())
        for name in ("input_per_million", "output_per_million", "per_image"):
            if name in form.base_fields:
                form.base_fields[name].help_text += f" ({settings.CURRENCY})"
        return form

    def has_change_permission(self, request, obj=None):
        # A scheduled price may still be corrected; one in effect has priced queries.
        if obj is not None and obj.in_effect():
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.in_effect():
            return False
        return super().has_delete_permission(request, obj)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        obj = self.get_object(request, object_id)
        if obj is not None and obj.in_effect() and request.method == "POST":
            self.message_user(request, IN_EFFECT_MESSAGE, messages.ERROR)
            return HttpResponseRedirect(request.path)
        if obj is not None and obj.in_effect():
            self.message_user(request, IN_EFFECT_MESSAGE, messages.WARNING)
        return super().change_view(request, object_id, form_url, extra_context)

    def delete_view(self, request, object_id, extra_context=None):
        obj = self.get_object(request, object_id)
        if obj is not None and obj.in_effect():
            self.message_user(request, IN_EFFECT_MESSAGE, messages.ERROR)
            return HttpResponseRedirect(reverse("admin:inference_modelprice_change", args=[obj.pk]))
        return super().delete_view(request, object_id, extra_context)

    def delete_queryset(self, request, queryset):
        # The bulk action deletes only scheduled prices; it says so for the others.
        now = timezone.now()
        in_effect = queryset.filter(effective_from__lte=now)
        if in_effect.exists():
            self.message_user(request, IN_EFFECT_MESSAGE, messages.ERROR)
        queryset.filter(effective_from__gt=now).delete()

    def save_model(self, request, obj, form, change):
        if obj.created_by_id is None:
            obj.created_by = request.user
        now = timezone.now()
        if obj.effective_from < now:  # "now" as the form was filled in: from its saving on
            obj.effective_from = now
        super().save_model(request, obj, form, change)


IN_EFFECT_MESSAGE = (
    "This price is already in effect: queries were priced by it, and history is never rewritten, so "
    "it cannot be edited or deleted. Add a new price with a later effective date instead."
)
