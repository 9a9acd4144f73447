from rest_framework.authentication import BaseAuthentication

from accounts import services


class ApiKeyAuthentication(BaseAuthentication):
    """``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; the key becomes ``request.auth``."""

    def authenticate(self, request):
        plaintext = services.key_from_headers(
            request.META.get("HTTP_AUTHORIZATION"), request.META.get("HTTP_X_API_KEY")
        )
        if plaintext is None:
            return None  # DRF answers NotAuthenticated -> 401 unauthorized
        api_key = services.authenticate_key(plaintext)
        return api_key, api_key

    def authenticate_header(self, request):
        return 'Bearer realm="sightline"'
