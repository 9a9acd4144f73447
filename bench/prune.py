"""Pruning a month of a large query log while queries keep arriving, and what the log costs on disk.

    .venv/bin/python bench/prune.py [--rows 1000000] [--batch 500]

Recreates the benchmark database and fills it as bench/pages.py does (N query rows over 90 days, 4
tenants, their rollups; SQL, no model). Then:

1. Size: the query tables' size per 100,000 queries (rows, TOAST, indexes), and the same with one
   normalised image per query kept in the row as before issue 14 (measured on a sample of rows
   holding a real 448-pixel PNG, scaled to 100,000) against its key in storage now.
2. Inserts alone: a thread writes queries through the admission path (``services.accept``, one
   image each, to the filesystem store) for a few seconds: latency p50/p99/max.
3. Pruning with inserts: every tenant keeps content and images 60 days, so the month of rows
   older than that expires (about a third); the pruner (``inference.privacy.prune``, the workers'
   code) runs to the end while the thread keeps inserting. Printed: rows pruned per second, the
   insert latencies meanwhile, how many inserts took over a second, and how many times a sampler
   (pg_stat_activity every 20 ms) saw the inserting connection waiting on a lock.
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta

from _common import fresh_database, pct  # noqa: E402

os.environ.setdefault("SECRET_KEY", "bench-only-secret-key-" + "x" * 40 + "-0123456789")


def photo_png(width=448, height=336, seed=3) -> bytes:
    """A photo-like picture (smooth regions, fine noise), normalised as the API stores it."""
    import io

    from PIL import Image, ImageFilter

    rng = random.Random(seed)
    small = Image.frombytes("RGB", (56, 42), bytes(rng.randrange(256) for _ in range(56 * 42 * 3)))
    base = small.resize((width, height), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    noise = Image.frombytes(
        "RGB", (width, height), bytes(rng.randrange(-12, 13) % 256 for _ in range(width * height * 3))
    )
    picture = Image.blend(base, noise, 0.02)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


class Inserter(threading.Thread):
    """Writes queries through services.accept as fast as it can, recording each one's latency."""

    def __init__(self, api_key, png):
        super().__init__(daemon=True)
        self.api_key, self.png = api_key, png
        self.latencies: list[float] = []
        self.stop = threading.Event()
        self.pid = None
        self.ready = threading.Event()

    def run(self):
        from django.db import connection

        from inference import services
        from inference.models import Query

        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            self.pid = cursor.fetchone()[0]
        self.ready.set()
        data = services.check_input(prompt="What is in this picture?", images=[self.png])
        while not self.stop.is_set():
            started = time.perf_counter()
            services.accept(self.api_key, data, endpoint=Query.Endpoint.QUERIES)
            self.latencies.append(time.perf_counter() - started)
        connection.close()


class LockSampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.samples, self.waiting = pid, 0, 0
        self.stop = threading.Event()

    def run(self):
        from django.db import connection

        with connection.cursor() as cursor:
            while not self.stop.is_set():
                cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [self.pid])
                row = cursor.fetchone()
                self.samples += 1
                self.waiting += bool(row and row[0] == "Lock")
                time.sleep(0.02)
        connection.close()


def latencies(values) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"n={len(ms):,} p50 {pct(ms, 50):.1f} ms, p99 {pct(ms, 99):.1f} ms, max {max(ms):.1f} ms, "
        f"{sum(1 for v in values if v > 1.0)} over 1 s"
    )


def table_bytes(cursor, table) -> int:
    cursor.execute("SELECT pg_total_relation_size(%s)", [table])
    return cursor.fetchone()[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--alone-seconds", type=float, default=10.0)
    args = parser.parse_args()

    images_dir = tempfile.mkdtemp(prefix="sightline-bench-images-")
    env = {
        "DATABASE_URL": fresh_database(),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "IMAGE_STORAGE_DIR": images_dir,
        "PRUNE_INTERVAL_SECONDS": "0",
    }
    os.environ.update(env)
    import django

    django.setup()
    sys.path.insert(0, os.path.dirname(__file__))
    from pages import fill

    fill(args.rows)
    from django.db import connection
    from django.utils import timezone

    from accounts.models import ApiKey, Tenant
    from inference import privacy
    from inference.models import Query

    png = photo_png()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE inference_query")
        rows = Query.objects.count()
        query_bytes = table_bytes(cursor, "inference_query")
        # The layout before issue 14: the PNG in the image row. A sample of rows, scaled.
        sample = 2000
        cursor.execute("CREATE TEMP TABLE old_images (LIKE inference_queryimage INCLUDING ALL)")
        cursor.execute(
            "INSERT INTO old_images (query_id, position, sha256, format, size_bytes, width, height, content,"
            " content_type, key) SELECT id, 0, repeat('a', 64), 'JPEG', 123456, 1024, 768, %s, 'image/png', ''"
            " FROM inference_query LIMIT %s",
            [png, sample],
        )
        cursor.execute("ANALYZE old_images")
        old_image_row = table_bytes(cursor, "old_images") / sample
        cursor.execute("UPDATE old_images SET content = NULL, key = 't1/ab/' || repeat('f', 64) || '.png'")
        cursor.execute("VACUUM FULL old_images")
        new_image_row = table_bytes(cursor, "old_images") / sample
    per = 100_000
    print(f"\nsize per {per:,} queries ({rows:,} rows; one {len(png) / 1000:.0f} KB normalised PNG per query):")
    print(f"  query rows + TOAST + indexes: {query_bytes / rows * per / 1e6:,.1f} MB")
    print(
        f"  image rows before (PNG in the row): {old_image_row * per / 1e6:,.1f} MB;"
        f" now (key only): {new_image_row * per / 1e6:,.1f} MB, the PNGs in object storage"
    )
    print(
        f"  database total before: {(query_bytes / rows + old_image_row) * per / 1e6:,.1f} MB;"
        f" now: {(query_bytes / rows + new_image_row) * per / 1e6:,.1f} MB"
    )

    acme = Tenant.objects.get(slug="acme")
    api_key = ApiKey.objects.filter(tenant=acme).select_related("tenant").first()

    inserter = Inserter(api_key, png)
    inserter.start()
    inserter.ready.wait()
    time.sleep(args.alone_seconds)
    alone = list(inserter.latencies)
    print(f"\ninserts alone ({args.alone_seconds:g} s): {latencies(alone)}")

    Tenant.objects.update(content_retention_days=60, image_retention_days=60)
    cutoff_rows = Query.objects.filter(created_at__lt=timezone.now() - timedelta(days=60)).count()
    sampler = LockSampler(inserter.pid)
    sampler.start()
    mark = len(inserter.latencies)
    started = time.perf_counter()
    counts = privacy.prune(batch=args.batch)
    elapsed = time.perf_counter() - started
    during = inserter.latencies[mark:]
    inserter.stop.set()
    sampler.stop.set()
    inserter.join()
    sampler.join()
    pruned = counts["content_removed"]
    print(
        f"\npruning {pruned:,} queries' content (of {cutoff_rows:,} older than 60 days) and {counts['images_removed']}"
        f" queries' images, in batches of {args.batch}: {elapsed:.1f} s, {pruned / elapsed:,.0f} rows/s"
    )
    print(f"inserts meanwhile: {latencies(during)}")
    print(
        f"lock sampler: the inserting connection was waiting on a lock in {sampler.waiting} of"
        f" {sampler.samples} samples"
    )
    if during and alone:
        print(f"(median insert {statistics.median(during) / statistics.median(alone):.2f}x the median alone)")


if __name__ == "__main__":
    main()
