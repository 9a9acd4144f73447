"""The HTTP API's own Django handler: the same views, a shorter middleware chain.

Under ASGI, Django runs each ``MiddlewareMixin`` middleware's ``process_request`` and
``process_response`` through ``sync_to_async``: a hop to a thread and back, twice per middleware,
and a sync-only one (WhiteNoise) adds two more around everything inside it. The site's nine
middlewares cost an API request about 4.7 ms of its time on the 2-core CI machine (bench/README.md,
"the request path"), for nothing: the API (``/v1/``) authenticates by key (DRF), is exempt from
CSRF, keeps no session, sets no messages and serves no static files.

So ``/v1/`` requests go to a second ``ASGIHandler`` built from ``API_MIDDLEWARE`` (settings): CORS
(async already) and the header middlewares, which do no I/O and so run inline on the event loop
(``Inline``) instead of hopping to a thread. The request then takes one hop, to its view.
"""

from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware


class Inline:
    """For a ``MiddlewareMixin`` whose hooks only compute (headers, redirects; no database, no
    network): run them on the event loop instead of through ``sync_to_async``."""

    async def __acall__(self, request):
        response = self.process_request(request) if hasattr(self, "process_request") else None
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class InlineSecurityMiddleware(Inline, SecurityMiddleware):
    pass


class InlineCommonMiddleware(Inline, CommonMiddleware):
    """Also validates the Host header against ALLOWED_HOSTS (``request.get_host()``), as on the site."""


class InlineXFrameOptionsMiddleware(Inline, XFrameOptionsMiddleware):
    pass


class ApiASGIHandler(ASGIHandler):
    """Django's ASGI handler with ``API_MIDDLEWARE`` for ``MIDDLEWARE``."""

    def load_middleware(self, is_async=False):
        # Django reads the chain from settings.MIDDLEWARE; this runs once, at start-up, before the
        # server takes a request, so swapping the setting for the call is seen by nothing else.
        site = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = site


def split_by_path(site_app, api_app, prefix: str = "/v1/"):
    """One HTTP application: ``prefix`` to the API's handler, everything else to the site's."""

    async def application(scope, receive, send):
        app = api_app if scope["path"].startswith(prefix) else site_app
        await app(scope, receive, send)

    return application
