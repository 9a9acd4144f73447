import socket
import sys

from django.conf import settings
from django.core.management.base import BaseCommand

from inference import workers


class Command(BaseCommand):
    help = (
        "Exit 0 when a Celery worker on this host has a live heartbeat in Redis with its model loaded "
        "(on INFERENCE_QUEUE), else 1. The worker image's HEALTHCHECK and the worker pod's liveness probe."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default=socket.gethostname(), help="the worker's host name (this host's)")

    def handle(self, *args, host, **options):
        try:
            live = workers.live_workers()
        except Exception as exc:  # noqa: BLE001 - Redis unreachable: say so, not healthy
            self.stderr.write(f"cannot read worker heartbeats from Redis: {exc}")
            sys.exit(1)
        # A heartbeat's name is "<celery node name>:<pid>", the node name "<name>@<host>".
        mine = [w for w in live if w.get("name", "").rsplit(":", 1)[0].split("@", 1)[-1] == host]
        # A worker beside an engine server is alive while its engine is down (it waits for it, and
        # readiness says so); restarting it would not bring the engine back.
        loaded = [
            w
            for w in mine
            if w.get("queue") == settings.INFERENCE_QUEUE
            and (w.get("model_loaded") or (w.get("engine") or {}).get("backend") == "openai")
        ]
        if not loaded:
            self.stderr.write(
                f"no worker on {host} has a live heartbeat with its model loaded on {settings.INFERENCE_QUEUE}"
                f" ({len(mine)} live on this host)"
            )
            sys.exit(1)
        self.stdout.write(f"ok: {', '.join(w['name'] for w in loaded)}")
