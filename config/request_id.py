"""The id of each request (``X-Request-ID``): kept from the client when valid, else generated.

The ASGI middleware sets it for the whole of one HTTP request or websocket connection, in a context
variable: every log line of that request carries it (``RequestIdFilter`` in ``LOGGING``), a new
``Query`` row stores it (the model field's default), an ``internal_error`` quotes it, and every
response (and the websocket handshake) carries it back.
"""

import contextvars
import logging
import re

from config.ids import uuid7

HEADER = b"x-request-id"
# What a client may send as its own id; anything else is replaced (never echoed, never logged).
VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def current() -> str:
    """The id of the request being served, or "" outside one (workers, commands)."""
    return _current.get()


def choose(client_value: bytes | None) -> str:
    if client_value is not None:
        value = client_value.decode("latin-1")
        if VALID.fullmatch(value):
            return value
    return uuid7().hex  # time-ordered: the query log's request_id index grows at its right edge


class RequestIdMiddleware:
    """ASGI middleware, outermost: assigns the id before anything else runs, so that even a 413 from
    ``config.limits`` carries it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        client_value = next((value for name, value in scope["headers"] if name == HEADER), None)
        request_id = choose(client_value)
        scope = {**scope, "request_id": request_id}
        start = "http.response.start" if scope["type"] == "http" else "websocket.accept"

        async def send_with_id(message):
            if message["type"] == start:
                headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
            await send(message)

        token = _current.set(request_id)
        try:
            return await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record ("-" outside a request) for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get() or "-"
        return True
