"""Origin checks for websockets.

Browsers always send ``Origin``; a page on another site must not open a websocket that rides on a
user's dashboard session, so a present Origin must match ``ALLOWED_HOSTS`` or
``CORS_ALLOWED_ORIGINS``. Programs (SDKs, servers, the ``websockets`` client) send no Origin and
authenticate with an API key, so a missing Origin is allowed — unlike channels'
``AllowedHostsOriginValidator``, which refuses them.
"""

from channels.security.websocket import OriginValidator
from django.conf import settings


class ApiOriginValidator(OriginValidator):
    def __init__(self, application):
        allowed = list(settings.ALLOWED_HOSTS) + list(settings.CORS_ALLOWED_ORIGINS)
        if settings.DEBUG and not settings.ALLOWED_HOSTS:
            allowed = ["localhost", "127.0.0.1", "[::1]"]
        super().__init__(application, allowed)

    def valid_origin(self, parsed_origin):
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)
