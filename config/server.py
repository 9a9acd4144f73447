"""The one way Sightline's web process is served: Uvicorn running ``config.asgi:application``.

Uvicorn, not Daphne: Daphne calls the application only after Twisted has read the whole request
body into memory (``daphne/http_protocol.py``, ``process()``), so a 100 MB upload is held ~12 times
over before any check. Uvicorn streams the body to the application, which lets
``config.limits`` refuse an oversized body by its ``Content-Length`` (or its bytes so far) before
reading it. ``manage.py serve`` (the embedded default, the Procfile, the tests) calls ``run``.
"""

import signal

import uvicorn
from django.conf import settings

from config import shutdown


class Server(uvicorn.Server):
    """Uvicorn's server, telling the application when a graceful shutdown begins: requests waiting
    for an answer then end with 503 instead of holding the shutdown up to the grace period."""

    def handle_exit(self, sig: int, frame) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            shutdown.begin()
        super().handle_exit(sig, frame)


def config(*, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        "config.asgi:application",
        host=host,
        port=port,
        lifespan="off",  # Django has no lifespan handler
        # The websocket consumer refuses frames over MAX_WS_FRAME_BYTES itself (an error frame, then
        # close 1009); frames far over it are closed 1009 by the protocol without being buffered.
        ws_max_size=2 * settings.MAX_WS_FRAME_BYTES,
        # In-flight requests get this long to finish after SIGTERM (those waiting for an answer end
        # at once with 503, see config/shutdown.py); a second is kept for cancelling the rest.
        timeout_graceful_shutdown=max(1.0, settings.SHUTDOWN_GRACE_SECONDS - 1.0),
        proxy_headers=True,
        forwarded_allow_ips=settings.FORWARDED_ALLOW_IPS,  # X-Forwarded-* believed only from these
        server_header=False,
        log_config=None,  # Django's LOGGING configures the loggers (request ids included)
    )


def run(*, host: str, port: int) -> None:
    Server(config(host=host, port=port)).run()
