from django.contrib import admin, messages

from accounts import services
from accounts.models import ApiKey, Membership, Tenant


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "slug",
        "is_active",
        "requests_per_minute",
        "requests_per_day",
        "tokens_per_month",
        "max_concurrent_requests",
        "monthly_budget",
        "privacy_mode",
        "content_retention_days",
        "image_retention_days",
        "created_at",
    ]
    list_filter = ["is_active", "privacy_mode"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]

    # Deleting a tenant deletes its queries and their stored images in batches
    # (inference.privacy.delete_tenant), never through Django's collector, which would load every
    # query of the tenant into memory; the confirmation page counts them instead of listing them.
    def get_deleted_objects(self, objs, request):
        from inference.admin import COUNT_CAP
        from inference.models import Query

        summary = []
        for tenant in objs:
            queries = Query.objects.filter(tenant=tenant).order_by()[: COUNT_CAP + 1].count()
            shown = f"more than {COUNT_CAP:,}" if queries > COUNT_CAP else f"{queries:,}"
            summary.append(
                f"Tenant {tenant.name}: {shown} queries and their stored images, "
                f"{tenant.api_keys.count()} API keys, {tenant.memberships.count()} memberships "
                "(its usage figures stay, anonymised)"
            )
        return summary, {"tenants": len(summary)}, set(), []

    def delete_model(self, request, obj):
        from inference import privacy

        privacy.delete_tenant(obj)

    def delete_queryset(self, request, queryset):
        from inference import privacy

        for tenant in queryset:
            privacy.delete_tenant(tenant)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role", "tenant"]
    search_fields = ["user__username", "tenant__name"]
    autocomplete_fields = ["user", "tenant"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are created by their tenants (dashboard) or the create_api_key command: the secret is
    shown once there. Here a key can be reviewed, given quota overrides, and revoked."""

    list_display = ["name", "tenant", "display_prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
    list_filter = ["tenant", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix", "tenant__name"]
    readonly_fields = ["tenant", "display_prefix", "created_by", "created_at", "last_used_at", "revoked_at"]
    fields = [
        "tenant",
        "name",
        "display_prefix",
        "created_by",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
        "requests_per_minute",
        "requests_per_day",
        "tokens_per_month",
        "max_concurrent_requests",
        "monthly_budget",
    ]
    actions = ["revoke", "delete_queries"]

    def has_add_permission(self, request):
        return False

    @admin.display(description="key")
    def display_prefix(self, obj):
        return f"sl_{obj.prefix}_…"

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        for api_key in queryset:
            services.revoke_api_key(api_key)
        self.message_user(request, f"Revoked {queryset.count()} key(s).", messages.SUCCESS)

    @admin.action(description="Delete the selected keys' queries (rows and images; usage figures stay)")
    def delete_queries(self, request, queryset):
        from inference import privacy

        deleted = objects = 0
        for api_key in queryset:
            counts = privacy.delete_queries(api_key_id=api_key.pk)
            deleted += counts["queries"]
            objects += counts["objects"]
        self.message_user(request, f"Deleted {deleted} queries and {objects} stored images.", messages.SUCCESS)
