from django.core.management.base import BaseCommand

from config import server


class Command(BaseCommand):
    help = "Serve HTTP and websockets with Uvicorn and Sightline's limits (see config/server.py)."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)

    def handle(self, *args, host, port, **options):
        server.run(host=host, port=port)
