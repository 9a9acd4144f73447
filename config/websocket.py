"""Origin checks for websockets.

Browsers always send ``Origin``; a page on another site must not open a websocket that rides on a
user's dashboard session, so a present Origin must be one of ``CORS_ALLOWED_ORIGINS`` (full
origins), or the origin of this very server: the scheme the request came in on and the request's
own ``Host`` (host and port), that host being one of ``ALLOWED_HOSTS``. Comparing the host alone
is not enough: ``http://localhost:1234`` is another site (any program on that port) than
``http://localhost:8000``, and an ``http://`` page is not the ``https://`` one. The rule is
Django's CSRF origin check (``request.scheme://request.get_host()``).

Programs (SDKs, servers, the ``websockets`` client) send no Origin and authenticate with an API
key, so a missing Origin is allowed — unlike channels' ``AllowedHostsOriginValidator``, which
refuses them.
"""

from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

DEFAULT_PORTS = {"http": 80, "https": 443}


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def normalise_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case, without a default port; None if it is not one."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != DEFAULT_PORTS[parts.scheme]:
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


def _is_secure(scope) -> bool:
    if scope.get("scheme") in ("wss", "https"):
        return True
    # Behind a TLS-terminating proxy, trust its header only when the settings say so (as Django does).
    proxy = getattr(settings, "SECURE_PROXY_SSL_HEADER", None)
    if proxy:
        name, expected = proxy
        value = _header(scope, name.lower().removeprefix("http_").replace("_", "-").encode())
        return value is not None and value.split(",")[0].strip() == expected
    return False


def _allowed_hosts() -> list[str]:
    if settings.DEBUG and not settings.ALLOWED_HOSTS:
        return [".localhost", "127.0.0.1", "[::1]"]  # what Django allows in DEBUG
    return list(settings.ALLOWED_HOSTS)


def origin_allowed(scope) -> bool:
    origin = _header(scope, b"origin")
    if origin is None:
        return True
    origin = normalise_origin(origin)
    if origin is None:  # "null" (sandboxed pages, file://) and anything that is not an origin
        return False
    if origin in {normalise_origin(o) for o in settings.CORS_ALLOWED_ORIGINS}:
        return True
    host = _header(scope, b"host")
    if not host:
        return False
    scheme = "https" if _is_secure(scope) else "http"
    if origin != normalise_origin(f"{scheme}://{host}"):
        return False
    domain, _ = split_domain_port(host.lower())
    return bool(domain) and validate_host(domain, _allowed_hosts())


class ApiOriginValidator:
    """ASGI middleware: refuse (403 at the handshake) a websocket whose Origin is not allowed."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.application(scope, receive, send)
