import csv

from django.contrib import admin
from django.http import StreamingHttpResponse
from django.urls import reverse
from django.utils.html import format_html

from inference.models import Query, UsageDaily


class _Echo:
    def write(self, value):
        return value


CSV_FIELDS = [
    "id",
    "created_at",
    "tenant",
    "api_key",
    "model",
    "endpoint",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "total_seconds",
    "error_code",
    "image_sha256",
    "prompt",
]


@admin.register(Query)
class QueryAdmin(admin.ModelAdmin):
    """The query log, read-only. Filter, search, look at one, or export a filtered list as CSV."""

    list_display = [
        "id",
        "created_at",
        "tenant",
        "api_key",
        "model",
        "endpoint",
        "status",
        "prompt_tokens",
        "completion_tokens",
        "latency",
    ]
    list_filter = ["status", "endpoint", "model", "tenant", "created_at"]
    search_fields = ["=id", "prompt"]
    date_hierarchy = "created_at"
    list_select_related = ["tenant", "api_key"]
    show_full_result_count = False  # no COUNT(*) over millions of rows on every page
    actions = ["export_csv"]
    exclude = ["params"]

    def get_queryset(self, request):
        return super().get_queryset(request).defer("answer", "params")

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in Query._meta.fields] + ["image_preview", "params", "latency", "answer"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_search_results(self, request, queryset, search_term):
        # `=id` must not break on text that is no UUID: search the prompt only then.
        import uuid

        try:
            uuid.UUID(search_term)
        except ValueError:
            return queryset.filter(prompt__icontains=search_term), False
        return super().get_search_results(request, queryset, search_term)

    @admin.display(description="latency (s)")
    def latency(self, obj):
        return None if obj.total_seconds is None else round(obj.total_seconds, 3)

    @admin.display(description="image")
    def image_preview(self, obj):
        return format_html(
            '<img src="{}" alt="query image" style="max-width:448px">', reverse("admin-query-image", args=[obj.pk])
        )

    @admin.action(description="Export the selected queries as CSV")
    def export_csv(self, request, queryset):
        return export_csv(queryset)


def export_csv(queryset) -> StreamingHttpResponse:
    writer = csv.writer(_Echo())

    def rows():
        yield writer.writerow(CSV_FIELDS)
        for q in queryset.select_related("tenant", "api_key").defer("answer").iterator(chunk_size=2000):
            yield writer.writerow(
                [
                    q.pk,
                    q.created_at.isoformat(),
                    q.tenant.slug,
                    q.api_key.name if q.api_key else "",
                    q.model,
                    q.endpoint,
                    q.status,
                    q.prompt_tokens,
                    q.completion_tokens,
                    q.total_seconds,
                    q.error_code,
                    q.image_sha256,
                    q.prompt,
                ]
            )

    response = StreamingHttpResponse(rows(), content_type="text/csv")
    response["Content-Disposition"] = 'attachment; filename="queries.csv"'
    return response


@admin.register(UsageDaily)
class UsageDailyAdmin(admin.ModelAdmin):
    list_display = [
        "date",
        "tenant",
        "api_key",
        "requests",
        "succeeded",
        "failed",
        "rejected",
        "prompt_tokens",
        "completion_tokens",
    ]
    list_filter = ["tenant", "date"]
    date_hierarchy = "date"
    list_select_related = ["tenant", "api_key"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
