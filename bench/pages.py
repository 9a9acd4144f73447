"""How fast the dashboard and admin pages answer with a large query log (default 1,000,000 rows).

    .venv/bin/python bench/pages.py [--rows 1000000] [--repeat 15]

Recreates the database `sightline_bench`, fills the query log with SQL (generate_series: 4 tenants,
8 keys, 90 days; 3% failed), builds the daily rollups from it the way settled queries would, and
ANALYZEs. Then it starts Uvicorn (the production web server, `manage.py serve`) on that database and asks each page
over HTTP with a signed-in session — a tenant owner for /dashboard/, a superuser for /admin/ —
printing each page's first request and p50 (and p99 with >= 200 repeats, else max) wall time. The
data is seeded (the same rows every run); PostgreSQL's cache is hot from the load. The rows are
synthetic (no model ran): this measures the pages' queries and rendering, not inference.
"""

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timedelta
from urllib.parse import quote

from _common import BENCH_DATABASE_URL, BENCH_DB, REPO, fresh_database, spread  # noqa: E402

TENANTS = [("acme", 0.55), ("globex", 0.25), ("initech", 0.15), ("umbrella", 0.05)]
DAYS = 90


def fill(rows: int) -> None:
    """The query log and its rollups, in SQL (the ORM would take an hour for a million rows)."""
    started = time.perf_counter()
    create_world()
    add_rows(rows, first=1)
    finish_load()
    add_images()
    print(f"filled {rows:,} query rows and their rollups in {time.perf_counter() - started:.1f} s")


def create_world() -> None:
    from django.contrib.auth import get_user_model

    from accounts import services
    from accounts.models import Membership

    owner = services.create_user("bench-owner", password="bench-password-123")
    get_user_model().objects.create_superuser("bench-admin", password="bench-password-123")
    for slug, _share in TENANTS:
        tenant = services.create_tenant(slug.title(), slug=slug)
        services.add_member(tenant, owner, Membership.Role.OWNER)
        for name in ("production", "staging"):
            services.create_api_key(tenant, name)


def add_rows(rows: int, first: int) -> None:
    """Rows number ``first`` .. ``first + rows - 1`` of the synthetic log (``finish_load`` after)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT setseed(%s)", [0.42 if first == 1 else (first % 1000) / 1000])  # seeded data
        cursor.execute(
            """
            WITH keys AS (
                SELECT k.id AS key_id, k.tenant_id, row_number() OVER (ORDER BY k.id) - 1 AS n FROM accounts_apikey k
            ), rows AS (
                SELECT g, random() AS r, random() AS s, now() - (random() * %(days)s) * interval '1 day' AS created
                FROM generate_series(%(first)s, %(last)s) g
            )
            INSERT INTO inference_query (
                id, tenant_id, api_key_id, model, endpoint, status, prompt, messages, params,
                answer, reasoning, tool_calls, choices, finish_reason, prompt_tokens, completion_tokens,
                error_code, error_message, client_ip, user_agent, worker, request_id, reserved_tokens, settled_at,
                created_at, started_at, first_token_at, finished_at)
            SELECT
                -- a UUIDv7 of the row's created_at, as config.ids.uuid7 makes them (48-bit ms, version 7,
                -- variant 10, random bits)
                (lpad(to_hex((extract(epoch FROM rows.created) * 1000)::bigint), 12, '0') || '7'
                    || substr(md5(g::text || 'id'), 1, 3) || substr('89ab', 1 + (g %% 4), 1)
                    || substr(md5(g::text || 'id'), 4, 15))::uuid,
                keys.tenant_id, keys.key_id, 'glm-4.6v-flash',
                (ARRAY['glm_infer','chat_completions','queries','websocket'])[1 + (g %% 4)],
                CASE WHEN rows.s < 0.03 THEN 'failed' ELSE 'succeeded' END,
                'Question number ' || g || ': what is in this picture?',
                jsonb_build_array(jsonb_build_object('role', 'user', 'content', jsonb_build_array(jsonb_build_object(
                    'type', 'text', 'text', 'Question number ' || g || ': what is in this picture?')))),
                '{}'::jsonb,
                CASE WHEN rows.s < 0.03 THEN '' ELSE 'A synthetic answer for benchmark row ' || g END,
                '', '[]'::jsonb, '[]'::jsonb,
                CASE WHEN rows.s < 0.03 THEN '' ELSE 'stop' END,
                200 + (g %% 100), CASE WHEN rows.s < 0.03 THEN 0 ELSE 20 + (g %% 200) END,
                CASE WHEN rows.s < 0.03 THEN 'worker_lost' ELSE '' END, '', '127.0.0.1', 'bench', 'bench@host',
                -- a generated X-Request-ID: a UUIDv7's hex (config/request_id.py)
                lpad(to_hex((extract(epoch FROM rows.created) * 1000)::bigint), 12, '0') || '7'
                    || substr(md5(g::text || 'rq'), 1, 3) || substr('89ab', 1 + (g %% 4), 1)
                    || substr(md5(g::text || 'rq'), 4, 15),
                256, rows.created, rows.created, rows.created + interval '20 ms',
                rows.created + interval '40 ms', rows.created + (0.2 + rows.s) * interval '1 second'
            FROM rows JOIN keys ON keys.n = (
                CASE WHEN rows.r < 0.55 THEN 0 WHEN rows.r < 0.80 THEN 2 WHEN rows.r < 0.95 THEN 4 ELSE 6 END
                + (g %% 2))
            -- In time order, as a live log is written: every index on a time-ordered key (the primary key,
            -- created_at, request_id) is written front to back once per batch, not at random.
            ORDER BY rows.created
            """,
            {"first": first, "last": first + rows - 1, "days": DAYS},
        )


def finish_load() -> None:
    """After ``add_rows``: the rollups rebuilt from the whole log (as settling each query would have
    written them), everything ANALYZEd."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM inference_usagedaily")
        buckets = ", ".join(
            f"count(*) FILTER (WHERE status = 'succeeded' AND ms {'>' if i else '>='} {low} AND ms <= {high})"
            for i, (low, high) in enumerate(_bucket_bounds())
        )
        cursor.execute(
            f"""
            INSERT INTO inference_usagedaily (date, tenant_id, api_key_id, model, endpoint, requests, succeeded,
                failed, rejected, prompt_tokens, completion_tokens, latency_ms_total, latency_histogram)
            SELECT day, tenant_id, api_key_id, model, endpoint, count(*), count(*) FILTER (WHERE status = 'succeeded'),
                count(*) FILTER (WHERE status = 'failed'), 0, coalesce(sum(prompt_tokens), 0),
                coalesce(sum(completion_tokens), 0),
                coalesce(sum(ms) FILTER (WHERE status = 'succeeded'), 0), jsonb_build_array({buckets})
            FROM (SELECT (created_at AT TIME ZONE 'UTC')::date AS day, tenant_id, api_key_id, model, endpoint,
                         status, prompt_tokens, completion_tokens,
                         (extract(epoch FROM finished_at - created_at) * 1000)::bigint AS ms
                  FROM inference_query) q
            GROUP BY day, tenant_id, api_key_id, model, endpoint
            """
        )
        cursor.execute("ANALYZE")


def add_images() -> None:
    from inference import chat, imagestore
    from inference.models import Query, QueryImage
    from inference.samples import sample_png

    # A few images (two per query), for the detail pages.
    png = sample_png()
    digest = hashlib.sha256(png).hexdigest()
    for query in Query.objects.order_by("-created_at")[:20]:
        key = imagestore.key_for(query.tenant_id, png)
        imagestore.put(key, png)
        Query.objects.filter(pk=query.pk).update(messages=chat.one_turn(query.prompt, 2))
        QueryImage.objects.bulk_create(
            QueryImage(
                query=query,
                position=position,
                sha256=digest,
                format="PNG",
                size_bytes=len(png),
                width=640,
                height=480,
                key=key,
                stored_bytes=len(png),
            )
            for position in range(2)
        )


def _bucket_bounds():
    from inference.models import UsageDaily

    bounds, low = [], 0
    for high in UsageDaily.LATENCY_BUCKETS_MS:
        bounds.append((low, high))
        low = high
    bounds.append((low, 2**62))
    return bounds


def time_inserts(count: int, *, ids: str = "v7") -> list[float]:
    """Seconds each of ``count`` queries takes to be written through the admission path
    (``services.accept``: the row, its indexes, the commit), text-only so that the image's PNG
    encoding does not hide the table's cost. Each insert runs under a request id as a request
    would (generated: the request_id index gets one too). ``ids="v4"`` gives the rows random UUID4
    ids, as before time-ordered ids (config/ids.py), for comparison."""
    import uuid

    from accounts.models import ApiKey
    from config import request_id
    from inference import services
    from inference.models import Query

    api_key = ApiKey.objects.select_related("tenant").filter(tenant__slug="acme").first()
    data = services.check_input(prompt="How long does this insert take?")
    pk = Query._meta.pk
    default = pk.default
    pk.default = uuid.uuid4 if ids == "v4" else default
    pk.__dict__.pop("_get_default", None)  # Field caches its default's callable
    times = []
    try:
        for _ in range(count):
            token = request_id._current.set(request_id.choose(None))
            started = time.perf_counter()
            services.accept(api_key, data, endpoint=Query.Endpoint.QUERIES)
            times.append(time.perf_counter() - started)
            request_id._current.reset(token)
    finally:
        pk.default = default
        pk.__dict__.pop("_get_default", None)
    return times


def index_io(run) -> tuple[object, list[tuple[str, int, int]]]:
    """``run()``'s result and, per index of inference_query, the blocks it read from outside
    shared_buffers (the OS cache or the disk) and found in shared_buffers meanwhile (pg_statio)."""
    from django.db import connection

    def snapshot():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT indexrelname, idx_blks_read, idx_blks_hit FROM pg_statio_user_indexes"
                " WHERE relname = 'inference_query'"
            )
            return {name: (read, hit) for name, read, hit in cursor.fetchall()}

    before = snapshot()
    result = run()
    # A backend flushes its statistics when a transaction ends at least 1 s after its last flush.
    time.sleep(1.1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    time.sleep(0.2)
    after = snapshot()
    rows = [
        (name, after[name][0] - before.get(name, (0, 0))[0], after[name][1] - before.get(name, (0, 0))[1])
        for name in after
    ]
    return result, sorted(rows, key=lambda r: -r[1])


def insert_figures(count: int) -> list[tuple[str, list[float], list]]:
    """Timed inserts at the log's present size, with UUIDv7 ids (now) and UUID4 ids (before
    config/ids.py). Returns (label, times, index I/O) for each."""
    from inference.models import Query

    label = f"{Query.objects.count():>12,} rows"
    figures = []
    for ids in ("v7", "v4"):
        times, io = index_io(lambda ids=ids: time_inserts(count, ids=ids))
        figures.append((f"{label}, {ids} ids", times, io))
        print(f"  inserts at {label}, {ids} ids: {spread(times, 1000)}", flush=True)
    return figures


def print_insert_figures(figures, count: int) -> None:
    print(f"\ninserting a query (services.accept, text only), {count} each:")
    for label, times, _io in figures:
        print(f"  {label:<52} {spread(times, 1000)}   mean {sum(times) / len(times) * 1000:.2f} ms")
    print("blocks each index read from outside shared_buffers during those inserts (read / hit):")
    for label, _times, io in figures:
        busy = ", ".join(f"{name} {read}/{hit}" for name, read, hit in io if read or hit > 2 * count)
        print(f"  {label:<52} {busy}")


def session_cookie(username: str) -> str:
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    client.force_login(get_user_model().objects.get(username=username))
    return client.cookies["sessionid"].value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument(
        "--grow-to",
        type=int,
        default=0,
        metavar="ROWS",
        help="time inserts at --rows, grow the log to ROWS, time them again, then measure the pages there",
    )
    parser.add_argument("--inserts", type=int, default=1000, help="timed inserts at each size (with --grow-to)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="measure the log a previous run left in BENCH_DB (migrated to this checkout) instead of filling one",
    )
    parser.add_argument("--finish", action="store_true", help="with --reuse: rebuild the rollups and ANALYZE first")
    parser.add_argument("--no-pages", action="store_true", help="time the inserts only")
    args = parser.parse_args()
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key-" + "x" * 40 + "-0123456789")
    os.environ.setdefault("IMAGE_STORAGE_DIR", tempfile.mkdtemp(prefix="sightline-bench-images-"))

    env = {
        "DATABASE_URL": BENCH_DATABASE_URL if args.reuse else fresh_database(),
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        "REDIS_KEY_PREFIX": "sightline-bench-pages",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
    }
    os.environ.update(env)
    import django

    django.setup()
    from django.db import connection

    from inference.models import Query

    figures = []
    if args.reuse:
        # The log a previous run left (same BENCH_DB): this checkout's migrations, then measure.
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, check=True)
        print(f"reusing {BENCH_DB}: {Query.objects.count():,} query rows", flush=True)
        if args.finish:
            finish_load()
        figures += insert_figures(args.inserts)
    else:
        fill(args.rows)
    if args.grow_to > args.rows and not args.reuse:
        figures += insert_figures(args.inserts)
        chunk, first = 1_000_000, args.rows + 1
        started = time.perf_counter()
        while first <= args.grow_to:
            rows = min(chunk, args.grow_to - first + 1)
            add_rows(rows, first=first)
            first += rows
            print(f"  {first - 1:,} rows ({time.perf_counter() - started:.0f} s)", flush=True)
        figures += insert_figures(args.inserts)
        finish_load()
        print(f"grew the log to {args.grow_to:,} rows in {time.perf_counter() - started:.1f} s", flush=True)
    if figures:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_total_relation_size('inference_query'), pg_indexes_size('inference_query')")
            total, indexes = cursor.fetchone()
        print(
            f"\ninference_query: {Query.objects.count():,} rows, {total / 1e9:.2f} GB ({indexes / 1e9:.2f} GB indexes)"
        )
        print_insert_figures(figures, args.inserts)
        sys.stdout.flush()

    if args.no_pages:
        return
    from accounts.models import ApiKey, Tenant

    acme = Tenant.objects.get(slug="acme")
    key = ApiKey.objects.filter(tenant=acme).first()
    recent = Query.objects.filter(tenant=acme).order_by("-created_at").only("id", "created_at").first()
    newest = Query.objects.order_by("-created_at").only("id", "created_at").first()
    old = (
        Query.objects.filter(tenant=acme)
        .order_by("-created_at")
        .only("created_at")[min(50_000, (Query.objects.count() if args.reuse else args.rows) // 10)]
    )
    owner, admin = session_cookie("bench-owner"), session_cookie("bench-admin")

    def day(ago: int) -> str:  # a UTC day of the log, for the query log's date range
        return (newest.created_at - timedelta(days=ago)).date().isoformat()

    with socket.socket() as probe:  # a free port: other benchmarks may run beside this one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    web = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError as exc:
                if web.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"the web process did not answer /health within 60 s ({exc}); exit {web.poll()}"
                    ) from exc
                time.sleep(0.2)
        pages = [
            ("owner", "/dashboard/"),
            ("owner", "/dashboard/?range=90&by=model"),
            ("owner", "/dashboard/?range=90&by=endpoint"),
            ("owner", "/dashboard/keys/"),
            ("owner", f"/dashboard/keys/{key.pk}/"),
            ("owner", f"/dashboard/keys/{key.pk}/revoke/"),
            ("owner", "/dashboard/queries/"),
            ("owner", "/dashboard/queries/?status=failed"),
            ("owner", f"/dashboard/queries/?key={key.pk}&endpoint=websocket"),
            ("owner", f"/dashboard/queries/?before={old.created_at.isoformat().replace('+', '%2B')}"),
            ("owner", f"/dashboard/queries/?before={quote(f'{old.created_at.isoformat()}~{old.pk}')}"),
            ("owner", f"/dashboard/queries/?date_from={day(30)}&date_to={day(20)}"),
            ("owner", f"/dashboard/queries/?date_from={day(30)}&date_to={day(20)}&status=failed&model=glm-4.6v-flash"),
            ("owner", f"/dashboard/queries/{recent.pk}/"),
            ("owner", "/dashboard/playground/"),
            ("owner", "/dashboard/data/"),
            ("owner", "/dashboard/members/"),
            ("admin", "/admin/"),
            ("admin", "/admin/usage/"),
            ("admin", "/admin/usage/?days=90"),
            ("admin", "/admin/usage/?range=90&by=key"),
            ("admin", "/admin/usage/?range=90&by=endpoint"),
            ("admin", "/admin/spend/"),
            ("admin", "/admin/spend/?range=90&by=model"),
            ("admin", "/admin/inference/query/"),
            ("admin", "/admin/inference/query/?p=50"),
            ("admin", f"/admin/inference/query/?tenant__id__exact={acme.pk}"),
            ("admin", "/admin/inference/query/?status__exact=failed"),
            ("admin", "/admin/inference/query/?model=glm-4.6v-flash&endpoint__exact=queries"),
            (
                "admin",
                f"/admin/inference/query/?created_at__year={newest.created_at.year}"
                f"&created_at__month={newest.created_at.month}",
            ),
            (
                "admin",
                f"/admin/inference/query/?created_at__year={newest.created_at.year}"
                f"&created_at__month={newest.created_at.month}&created_at__day={newest.created_at.day}",
            ),
            ("admin", f"/admin/inference/query/?q={recent.pk}"),
            ("admin", f"/admin/inference/query/{recent.pk}/change/"),
            ("admin", "/admin/inference/usagedaily/"),
            ("admin", "/admin/accounts/apikey/"),
            ("admin", "/admin/accounts/tenant/"),
            ("admin", "/admin/inference/query/?q=number+123456"),  # prompt search: the newest 20,000 queries
            (
                "admin",
                f"/admin/inference/query/?created_at__year={newest.created_at.year}"
                f"&created_at__month={newest.created_at.month}&q=number+123456",
            ),
            ("admin", "/admin/inference/query/?q=picture"),  # a common word: the newest 50 matches at once
            ("admin", f"/admin/inference/query/?q={recent.request_id}"),  # a request id
            ("admin", "/metrics"),  # not a page, but read from the same tables
        ]
        print(
            f"\n{Query.objects.count():,} query rows; each page asked {args.repeat} times over HTTP (Uvicorn)"
            " after a first request"
        )
        print(
            "PostgreSQL's cache is hot (the rows were just loaded): 'first' is each page's first request "
            "(cold for the web process), the rest are hot"
        )
        print(f"{'who':6} {'first ms':>9}  {'the others (ms)':<40}  page")
        for who, path in pages:
            cookie = f"sessionid={owner if who == 'owner' else admin}"
            times = []
            first = None
            for i in range(args.repeat + 1):
                request = urllib.request.Request(base + path, headers={"Cookie": cookie})
                t0 = time.perf_counter()
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                    status, landed = response.status, response.geturl()
                    assert "login" not in landed, f"{path} sent the {who} to {landed}"
                elapsed = time.perf_counter() - t0
                if i:
                    times.append(elapsed)
                else:
                    first = elapsed
            assert status == 200, (path, status)
            print(f"{who:6} {first * 1000:9.1f}  {spread(times, 1000, unit='', width=7):<40}  {path}")
    finally:
        web.terminate()
        web.wait(timeout=10)


if __name__ == "__main__":
    main()
