"""The request-body limit, enforced before the application reads anything (ASGI middleware).

A body over ``MAX_REQUEST_BYTES`` is refused with ``413 payload_too_large``: at once from its
``Content-Length``, without reading it, or (a chunked body with no length) the moment the bytes
streamed so far pass the limit. It wraps the whole HTTP application, so it holds before
authentication, for unknown paths too, and in the embedded default as in production. It relies on a
server that streams the body to the application (Uvicorn, config/server.py); Daphne reads the
whole body before calling the application.
"""

import json

from django.conf import settings

from config.errors import ApiError, error_body, error_style_for_path


def _too_large(detail: str) -> ApiError:
    limit_mb = settings.MAX_REQUEST_BYTES / (1024 * 1024)
    image_mb = settings.MAX_IMAGE_BYTES / (1024 * 1024)
    return ApiError(
        "payload_too_large",
        f"{detail} The limit is {limit_mb:.1f} MB (MAX_REQUEST_BYTES); an image may be at most {image_mb:g} MB, "
        f"at most {settings.MAX_IMAGES_PER_REQUEST} per request. Send a smaller or fewer images.",
    )


async def _refuse(scope, send, error: ApiError) -> None:
    body = json.dumps(error_body(error, error_style_for_path(scope.get("path", "")))).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is never read: the connection cannot carry another request.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app, *, limit: int | None = None):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = settings.MAX_REQUEST_BYTES if self.limit is None else self.limit
        length = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            size_mb = int(length) / (1024 * 1024)
            return await _refuse(scope, send, _too_large(f"The request body is {size_mb:.1f} MB (Content-Length)."))

        received = 0
        over = False
        started = False

        async def counted_receive():
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # The application sees a client that went away (Django drops what it read) and
                    # this middleware answers in its place; nothing more of the body is read.
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if over and not started:
                return  # the 413 below is the answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, counted_receive, guarded_send)
        if over and not started:
            await _refuse(scope, send, _too_large(f"The request body passed {received / (1024 * 1024):.1f} MB."))
