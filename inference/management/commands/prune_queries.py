import time

from django.core.management.base import BaseCommand, CommandError

from accounts.models import Tenant
from inference import imagestore, privacy


class Command(BaseCommand):
    help = (
        "Remove what the tenants' retention periods and privacy modes do not keep: content (prompts, "
        "conversations, answers) and images of expired queries, answers of metadata-mode queries past "
        "METADATA_HOLD_SECONDS, stored images no row refers to (older than ORPHAN_IMAGE_GRACE_SECONDS). "
        "In batches of their own transactions; rows and usage rollups stay. "
        "Workers run it every PRUNE_INTERVAL_SECONDS; this command is for cron or by hand."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant", metavar="SLUG", help="only this tenant")
        parser.add_argument("--batch-size", type=int, metavar="ROWS", help="rows per transaction (PRUNE_BATCH_SIZE)")
        parser.add_argument("--seconds", type=float, help="stop after this long (the next run goes on)")
        parser.add_argument("--loop", type=float, metavar="SECONDS", help="repeat every SECONDS instead of once")
        parser.add_argument(
            "--all-shards",
            action="store_true",
            help="look for orphaned images in the whole store (a pass reads one shard of 256: the next run the next)",
        )

    def handle(self, *args, tenant, batch_size, seconds, loop, all_shards, **options):
        tenant_id = None
        if tenant:
            tenant_id = Tenant.objects.filter(slug=tenant).values_list("pk", flat=True).first()
            if tenant_id is None:
                raise CommandError(f"no tenant {tenant!r}")
        while True:
            started = time.monotonic()
            counts = privacy.prune(
                batch=batch_size,
                seconds=seconds,
                tenant_id=tenant_id,
                orphan_shards=imagestore.SHARDS if all_shards else None,
            )
            elapsed = time.monotonic() - started
            self.stdout.write(
                f"{counts['content_removed']} queries' content removed, {counts['images_removed']} queries' images "
                f"removed, {counts['answers_released']} metadata-mode answers removed, {counts['images_moved']} "
                f"images moved out of the database, {counts['orphans_removed']} orphaned images deleted, "
                f"in {elapsed:.1f} s"
            )
            if not loop:
                return
            time.sleep(loop)
