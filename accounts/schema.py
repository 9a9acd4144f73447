"""How the OpenAPI schema describes API-key authentication."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.ApiKeyAuthentication"
    name = ["BearerKey", "XApiKey"]

    def get_security_requirement(self, auto_schema):
        # Either header suffices: two requirements (alternatives), not one requiring both.
        return [{"BearerKey": []}, {"XApiKey": []}]

    def get_security_definition(self, auto_schema):
        return [
            {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer sl_XXXXXXXX_..."},
            {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        ]
