"""The ASGI application: HTTP through Django, websockets through Channels."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi_app = get_asgi_application()  # set up Django before importing anything that uses models

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from config.api_handler import ApiASGIHandler, split_by_path  # noqa: E402
from config.limits import BodyLimitMiddleware  # noqa: E402
from config.request_id import RequestIdMiddleware  # noqa: E402
from config.routing import websocket_urlpatterns  # noqa: E402
from config.websocket import ApiOriginValidator  # noqa: E402

# Outermost first: the request id (so every answer carries it, a 413 too), then the body limit, which
# refuses an oversized body before Django reads it or authentication runs.
application = RequestIdMiddleware(
    ProtocolTypeRouter(
        {
            "http": BodyLimitMiddleware(split_by_path(django_asgi_app, ApiASGIHandler())),
            "websocket": ApiOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        }
    )
)

# The embedded default loads its model in the background as the server starts, not on the first request.
from django.conf import settings  # noqa: E402

if settings.EMBEDDED:
    from inference.dispatch import get_dispatcher  # noqa: E402

    get_dispatcher().start()
