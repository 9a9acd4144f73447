"""The cost of admission — authenticating a key and admitting it against its quotas — per request,
against the real PostgreSQL and Redis (the production path: one Lua call), at concurrency 1 and 32.

    .venv/bin/python bench/quota.py [--requests 2000]

Each request does what the web tier does before any input check: look the key up by prefix and
compare its hash (PostgreSQL), then the quota script (Redis); the slot is settled right after, as
a finished query would be. The latency and the admissions/s measure the same work: key lookup,
admission and settlement. Uses the database `sightline_bench` (recreated) and Redis database 14.
"""

import argparse
import os
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from _common import fresh_database, spread  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()

    os.environ.update(
        DATABASE_URL=fresh_database(),
        REDIS_URL=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        REDIS_KEY_PREFIX=f"sightline-bench-{uuid.uuid4().hex[:6]}",
        DB_POOL_MAX_SIZE="40",
        DJANGO_SETTINGS_MODULE="config.settings",
    )
    import django

    django.setup()
    from django.db import close_old_connections

    from accounts import quotas, services

    tenant = services.create_tenant(
        "Bench",
        slug="bench",
        requests_per_minute=10**9,
        requests_per_day=10**9,
        tokens_per_month=10**15,
        max_concurrent_requests=10**6,
    )
    _, key = services.create_api_key(tenant, "bench")

    def admit_once(_):
        start = time.perf_counter()
        api_key = services.authenticate_key(key)
        admission = quotas.admit(api_key, prompt="What is in this picture?", max_tokens=64)
        quotas.settle(api_key.pk, admission.id, used=100)
        elapsed = time.perf_counter() - start  # with the settlement, as in admissions/s below
        close_old_connections()
        return elapsed

    for _ in range(50):  # warm up: connections, the Lua script's SHA
        admit_once(0)
    print(
        f"\nAdmission cost (key lookup + admission + settlement), {args.requests} requests per run, "
        "PostgreSQL + Redis on this machine"
    )
    for concurrency in (1, 32):
        with ThreadPoolExecutor(concurrency) as pool:
            started = time.perf_counter()
            latencies = list(pool.map(admit_once, range(args.requests)))
            wall = time.perf_counter() - started
        print(
            f"concurrency {concurrency:>2}: {spread(latencies, 1000, width=6)}   "
            f"mean {statistics.mean(latencies) * 1000:6.2f} ms   {args.requests / wall:8.0f} admissions/s"
        )


if __name__ == "__main__":
    main()
