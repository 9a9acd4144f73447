from django.apps import AppConfig


class AccountsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "accounts"
    verbose_name = "Tenants and API keys"

    def ready(self):
        from accounts import schema  # noqa: F401 - registers the OpenAPI description of key auth
