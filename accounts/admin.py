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
        "created_at",
    ]
    list_filter = ["is_active"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]


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
    ]
    actions = ["revoke"]

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
