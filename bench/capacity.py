"""What one web process holds, and what the query log costs PostgreSQL: the README's capacity notes.

    .venv/bin/python bench/capacity.py [--sockets 1000] [--jobs 2000] [--concurrency 16]

Starts one production web process (Uvicorn, `manage.py serve`) on a fresh benchmark database and a
Redis database of its own, with no worker: the web tier alone (inference is measured by
bench/throughput.py). Then, printing each figure:

1. open websockets: `--sockets` connections, each authenticated (its `ready` frame), held open at
   once over keys of 32 sockets each (MAX_SOCKETS_PER_KEY); the process's RSS before and after;
2. accepted async jobs per second (`POST /v1/queries` with a 320x240 PNG: authentication, the
   quota admission in Redis, the image check, the row and its image, the dispatch to the queue) at
   `--concurrency` clients;
3. cheap authenticated reads per second (`GET /v1/usage`) at the same concurrency;
4. PostgreSQL bytes per query from those jobs (the query, image and index relations' growth),
   scaled to a million queries.

Figures depend on the machine; say which when you quote them.
"""

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from _common import PG, REPO, spread  # noqa: E402

REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "12"))
DATABASE = "sightline_capacity"


def fresh_database(env: dict) -> str:
    """Drop and create this benchmark's database and migrate it; its URL."""
    subprocess.run(["psql", f"{PG}/postgres", "-qc", f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)"], check=True)
    subprocess.run(["psql", f"{PG}/postgres", "-qc", f"CREATE DATABASE {DATABASE}"], check=True)
    url = f"{PG}/{DATABASE}"
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env={**env, "DATABASE_URL": url}, check=True
    )
    return url


SOCKETS_PER_KEY = 32


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def relation_bytes(database_url: str) -> dict[str, int]:
    """Each inference table's size with its indexes and TOAST."""
    out = subprocess.run(
        [
            "psql",
            database_url,
            "-Atc",
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
            "WHERE c.relkind = 'r' AND c.relname LIKE 'inference_%'",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return {name: int(size) for name, size in (line.split("|") for line in out.stdout.split())}


def request(url: str, key: str, body: dict | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def closed_loop(n: int, concurrency: int, call) -> tuple[float, list[float], dict]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    counter = iter(range(n))

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            status = call(i)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                statuses[status] = statuses.get(status, 0) + 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    return time.perf_counter() - start, latencies, statuses


async def hold_sockets(ws_url: str, keys: list[str], count: int, pid: int) -> None:
    import websockets

    sockets = []
    before = rss_mb(pid)
    start = time.perf_counter()
    for i in range(count):
        ws = await websockets.connect(ws_url, max_size=None, open_timeout=30)
        await ws.send(json.dumps({"type": "auth", "api_key": keys[i // SOCKETS_PER_KEY]}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if frame.get("type") != "ready":
            raise SystemExit(f"socket {i}: {frame}")
        sockets.append(ws)
    opened = time.perf_counter() - start
    await asyncio.sleep(2)
    after = rss_mb(pid)
    # Every socket still answers: a bad frame gets an error frame on each.
    for ws in sockets:
        await ws.send("not json")
    answered = 0
    for ws in sockets:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
        answered += frame.get("type") == "error"
    print(
        f"websockets: {count} open and authenticated in {opened:.1f} s; {answered} of them answering; "
        f"web RSS {before:.0f} MB -> {after:.0f} MB ({(after - before) * 1024 / count:.1f} KB per socket)"
    )
    for ws in sockets:
        await ws.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    env = {
        **os.environ,
        "SECRET_KEY": os.environ.get("SECRET_KEY", "bench-only-secret-key-not-for-production-0123456789abcdef"),
        "REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "REDIS_KEY_PREFIX": f"bench-capacity-{os.getpid()}",
        "INFERENCE_QUEUE": f"infer.bench-capacity-{os.getpid()}",
        "READY_REQUIRES_WORKER": "0",
        "DEBUG": "0",
    }
    database_url = fresh_database(env)
    env["DATABASE_URL"] = database_url
    os.environ.update({k: env[k] for k in ("SECRET_KEY", "DATABASE_URL", "REDIS_URL", "REDIS_KEY_PREFIX")})
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from accounts import services
    from inference.samples import sample_png

    tenant = services.create_tenant(
        "Capacity",
        slug="capacity",
        requests_per_minute=None,
        requests_per_day=None,
        tokens_per_month=None,
        max_concurrent_requests=None,
    )
    keys = [
        services.create_api_key(tenant, f"k{i}")[1] for i in range(max(1, -(-args.sockets // SOCKETS_PER_KEY)), 0, -1)
    ]
    image = base64.b64encode(sample_png()).decode()

    port = int(os.environ.get("BENCH_PORT", "8791"))
    web = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        print(f"one web process (pid {web.pid}), no worker; {os.cpu_count()} CPUs; RSS {rss_mb(web.pid):.0f} MB idle")

        asyncio.run(hold_sockets(f"ws://127.0.0.1:{port}/ws/v1/infer", keys, args.sockets, web.pid))

        size_before = relation_bytes(database_url)
        body = {"image": image, "prompt": "What is in this picture?", "max_tokens": 64}
        seconds, latencies, statuses = closed_loop(
            args.jobs, args.concurrency, lambda i: request(url + "/v1/queries", keys[i % len(keys)], body)
        )
        print(
            f"POST /v1/queries (320x240 PNG): {args.jobs / seconds:7.1f} accepted/s at c={args.concurrency}   "
            f"{spread(latencies, 1000)}   statuses {statuses}"
        )
        seconds, latencies, statuses = closed_loop(
            args.reads, args.concurrency, lambda i: request(url + "/v1/usage", keys[i % len(keys)])
        )
        print(
            f"GET /v1/usage:                {args.reads / seconds:7.1f} answered/s at c={args.concurrency}   "
            f"{spread(latencies, 1000)}   statuses {statuses}"
        )
        subprocess.run(["psql", database_url, "-qc", "VACUUM ANALYZE"], check=True)
        after = relation_bytes(database_url)
        grown = {name: after[name] - size_before.get(name, 0) for name in after}
        image_bytes = grown.get("inference_queryimage", 0)
        other = sum(grown.values()) - image_bytes
        print(
            f"PostgreSQL per query: {other / args.jobs / 1024:.1f} KB of rows and indexes without the image "
            f"({other / args.jobs * 1e6 / 1e9:.1f} GB per million queries), plus the stored image: "
            f"{image_bytes / args.jobs / 1024:.1f} KB here (the sample PNG compresses well; a 448-pixel photo is "
            f"100-300 KB: 100-300 GB per million queries)"
        )
    finally:
        web.terminate()
        try:
            web.wait(timeout=30)
        except subprocess.TimeoutExpired:
            web.kill()
        import redis

        client = redis.Redis.from_url(env["REDIS_URL"])
        for pattern in (f"{env['REDIS_KEY_PREFIX']}:*", f"{env['INFERENCE_QUEUE']}*"):
            for name in client.scan_iter(match=pattern):
                client.delete(name)


if __name__ == "__main__":
    main()
