"""Whether this process is shutting down (SIGTERM), for code that waits on behalf of a client.

The server (config/server.py) marks the start of a graceful shutdown here. Waits that could outlast
the grace period (a sync request waiting for its answer, an SSE stream) check it and end with
``503 service_unavailable`` at once: the query itself goes on and can be polled.
"""

import threading

_shutting_down = threading.Event()


def begin() -> None:
    _shutting_down.set()


def in_progress() -> bool:
    return _shutting_down.is_set()
