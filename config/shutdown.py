"""Whether this process is shutting down (SIGTERM), for code that waits on behalf of a client.

The server (config/server.py) marks the start of a graceful shutdown here. Waits that could outlast
the grace period (a sync request waiting for its answer, an SSE stream) check it and end with
``503 service_unavailable`` at once: the query itself goes on and can be polled.

``begin`` runs in a signal handler, which Python runs in the main thread between any two bytecodes,
also inside the handler of a signal that came just before (a second Ctrl-C, or SIGTERM sent to the
process and to its parent that passes it on). It therefore only assigns a flag: a
``threading.Event`` took its lock there, and a second signal arriving while the first handler held
it waited on that lock forever (the server never shut down; seen with ``make serve``).
"""

_shutting_down = False


def begin() -> None:
    global _shutting_down
    _shutting_down = True


def in_progress() -> bool:
    return _shutting_down
