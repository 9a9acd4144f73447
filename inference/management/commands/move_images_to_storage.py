from django.core.management.base import BaseCommand

from inference import imagestore
from inference.models import Query, QueryImage


class Command(BaseCommand):
    help = (
        "Move images still held in the database (QueryImage.content, before migration 0011) to image "
        "storage, in batches of their own transactions. Resumable, and safe beside the running service and "
        "another run of itself. Migration 0012 runs the same; on a large database run this first, after "
        "`migrate inference 0011`, so that the migration finds little left."
    )

    def add_arguments(self, parser):
        parser.add_argument("--batch-size", type=int, default=200, metavar="ROWS")

    def handle(self, *args, batch_size, **options):
        moved = imagestore.move_rows_to_storage(Query, QueryImage, batch=batch_size, log=self.stdout.write)
        self.stdout.write(f"{moved} images moved to storage; none left in the database")
