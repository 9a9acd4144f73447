"""Prepare the embedded default for a first request: a demo tenant, a fresh key, a sample image and
a ready ``curl`` line. The key is new on every run, since keys are stored only as hashes."""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from accounts import services
from accounts.models import Tenant
from inference.samples import sample_png


class Command(BaseCommand):
    help = "Create the demo tenant (once) and a new API key, and print a ready curl line."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", default="8000")

    def handle(self, *args, host, port, **options):
        tenant = Tenant.objects.filter(slug="demo").first() or services.create_tenant("Demo", slug="demo")
        _, plaintext = services.create_api_key(tenant, "quickstart")
        image = Path(settings.VAR_DIR) / "demo.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(sample_png())
        url = f"http://{host}:{port}/v1/glm/infer"
        self.stdout.write(
            "\n".join(
                [
                    "",
                    "Sightline (embedded default) is starting.",
                    f"  model: {settings.INFERENCE_MODEL}",
                    "  (the tiny model from build_tiny_model is randomly initialised: its answers are noise)",
                    f"  demo tenant 'demo', new API key (shown once): {plaintext}",
                    "",
                    "Try it once the server is up:",
                    f'  curl -s -H "Authorization: Bearer {plaintext}" -F image=@{image} '
                    f'-F prompt="What is in this picture?" {url}',
                    "",
                    f"API docs: http://{host}:{port}/docs",
                    "",
                ]
            )
        )
