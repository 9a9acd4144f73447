from django.apps import AppConfig


class DashboardConfig(AppConfig):
    """The consoles people look at: the tenant dashboard (/dashboard/) and the operators' pages beside
    Django's admin (/admin/usage/, ...). Views only: it reads through ``accounts`` and ``inference``
    (services and selectors) and nothing imports it, so no cycle between the apps."""

    name = "dashboard"
    default_auto_field = "django.db.models.BigAutoField"
