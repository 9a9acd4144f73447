from django.conf import settings
from django.core.management.base import BaseCommand

from inference.engine.tiny_model import build_tiny_model, is_built


class Command(BaseCommand):
    help = (
        "Build, offline, a tiny randomly initialised model of GLM-4.6V-Flash's architecture for tests "
        "and the embedded default. Its answers are random noise."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--out", default=str(settings.TINY_MODEL_DIR), help="folder to write (default: %(default)s)"
        )
        parser.add_argument("--force", action="store_true", help="rebuild even if the folder holds a model")
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args, out, force, seed, **options):
        if is_built(out) and not force:
            self.stdout.write(f"tiny model already built in {out} (use --force to rebuild)")
            return
        folder = build_tiny_model(out, seed=seed)
        size = sum(f.stat().st_size for f in folder.iterdir()) / 1024
        self.stdout.write(
            f"tiny model written to {folder} ({size:.0f} KB). It is randomly initialised: its answers are noise."
        )
