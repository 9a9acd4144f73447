from django.contrib import admin, messages

from accounts import services
from accounts.models import ApiKey, AuditEvent, Invitation, Membership, Tenant
from config.admin_widgets import FORMFIELD_OVERRIDES


class MembershipInline(admin.StackedInline):
    """Stacked, not tabular: a tabular inline's fields have no label of their own (axe-core)."""

    model = Membership
    extra = 0
    autocomplete_fields = ["user"]
    readonly_fields = ["created_at"]


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
        "privacy_mode",
        "content_retention_days",
        "image_retention_days",
        "created_at",
    ]
    list_filter = ["is_active", "privacy_mode"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]
    readonly_fields = ["created_at"]
    formfield_overrides = FORMFIELD_OVERRIDES

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
    readonly_fields = ["created_at"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are created by their tenants (dashboard) or the create_api_key command: the secret is
    shown once there. Here a key can be reviewed, given quota overrides, and revoked."""

    formfield_overrides = FORMFIELD_OVERRIDES

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
    ]
    actions = ["revoke", "delete_queries"]

    def has_add_permission(self, request):
        return False

    def save_model(self, request, obj, form, change):
        """Through the service, so the tenant's activity log records what changed and who changed it."""
        changes = {name: form.cleaned_data[name] for name in form.changed_data}
        services.edit_api_key(api_key=obj, actor=request.user, changes=changes)

    @admin.display(description="key")
    def display_prefix(self, obj):
        return f"sl_{obj.prefix}_…"

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        for api_key in queryset:
            services.revoke_api_key(api_key, actor=request.user)
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


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    """Invitation links are created by tenant owners (dashboard, Members); only their hash is stored."""

    list_display = ["id", "tenant", "role", "created_by", "created_at", "expires_at", "accepted_by", "revoked_at"]
    list_filter = ["role", "tenant"]
    readonly_fields = [f.name for f in Invitation._meta.fields if f.name != "token_hash"]
    exclude = ["token_hash"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """The tenants' activity logs, read-only."""

    list_display = ["created_at", "tenant", "actor_name", "action", "target"]
    list_filter = ["action", "tenant"]
    search_fields = ["actor_name", "target"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
