"""End-to-end benchmark: the real stack (Uvicorn + Redis + a Celery worker + PostgreSQL) against the
engine called directly, in the same run, on the same image and settings.

    .venv/bin/python bench/e2e.py [--requests 200] [--concurrency 4] [--workers 1] [--max-tokens 32]
        [--torch-threads 1]

It creates (and drops) a database `sightline_bench` on the local PostgreSQL (`BENCH_DB` names
another) and uses Redis database 14 (`BENCH_REDIS_DB`). The model is the tiny random model from
build_tiny_model unless INFERENCE_MODEL is set: its answers are noise, and on the CPU its speed is
nothing like GLM-4.6V-Flash on a GPU; the figures show what the platform adds around the engine.
"""

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import (
    BENCH_DATABASE_URL,
    BENCH_REDIS_DB,
    REPO,
    fresh_database,
    pct,
    spread,
    stop_on_sigterm,
    torch_threads_env,
)  # noqa: E402


def fmt(values):
    return f"{spread(values, 1000)}   mean {statistics.mean(values) * 1000:8.1f} ms"


def setup_database():
    fresh_database()
    subprocess.run([sys.executable, "manage.py", "build_tiny_model"], cwd=REPO, check=True, capture_output=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="per run; >= 200 for a p99 (else max is shown)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="Celery workers on the queue (one per GPU)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch CPU threads of every process (see bench/_common.py)"
    )
    args = parser.parse_args()
    stop_on_sigterm()
    threads_env = torch_threads_env(args.torch_threads)

    setup_database()
    os.environ["DATABASE_URL"] = BENCH_DATABASE_URL
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.conf import settings

    from accounts import services as accounts
    from inference import chat
    from inference.engine import Engine, EngineRequest, SamplingParams
    from inference.samples import sample_png
    from tests.stack import Stack

    model = settings.INFERENCE_MODEL
    png = sample_png()
    image_b64 = base64.b64encode(png).decode()
    tenant = accounts.create_tenant(
        "Bench",
        slug="bench",
        requests_per_minute=None,
        requests_per_day=None,
        tokens_per_month=None,
        max_concurrent_requests=None,
    )
    key = accounts.create_api_key(tenant, "bench")[1]
    body = json.dumps(
        {"image": image_b64, "prompt": "What is in this picture?", "max_tokens": args.max_tokens}
    ).encode()

    # --- the engine alone ----------------------------------------------------------------------
    from inference.images import check_image

    image = check_image(png).image
    engine = Engine.load(model)
    sampling = SamplingParams(max_new_tokens=args.max_tokens)

    def ask(prompt: str) -> EngineRequest:
        # What a worker builds from a stored /v1/glm/infer query: one user turn, the image, then the text.
        return EngineRequest(messages=chat.one_turn(prompt, 1), images=[image], sampling=sampling)

    engine.generate(ask("warm up"))
    engine_latency, engine_ttft, engine_tokens = [], [], []
    for _ in range(args.requests):
        start = time.perf_counter()
        generation = engine.stream(ask("What is in this picture?"))
        first = None
        for _delta in generation:
            first = first or time.perf_counter()
        engine_latency.append(time.perf_counter() - start)
        engine_ttft.append((first or time.perf_counter()) - start)
        engine_tokens.append(generation.result.completion_tokens)

    # --- the platform --------------------------------------------------------------------------
    log_dir = Path(tempfile.mkdtemp(prefix="sightline-bench-"))
    # Production's heartbeat and sweeper settings, not the tests' faster ones.
    production = {
        name: str(getattr(settings, name))
        for name in ("WORKER_HEARTBEAT_SECONDS", "WORKER_HEARTBEAT_TTL", "SWEEP_INTERVAL_SECONDS")
    }
    stack = Stack(log_dir, database=BENCH_DATABASE_URL, INFERENCE_MODEL=model, **production, **threads_env)
    stack.redis_url = stack.redis_url.rsplit("/", 1)[0] + f"/{BENCH_REDIS_DB}"
    stack.env["REDIS_URL"] = stack.redis_url
    stack.start_web()
    for n in range(args.workers):
        stack.start_worker(f"bench{n}")
    try:
        stack.wait_ready(workers=args.workers)

        def one(_):
            request = urllib.request.Request(
                stack.url + "/v1/glm/infer",
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
            )
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as response:
                payload = json.load(response)
            assert payload["code"] == 0, payload
            return time.perf_counter() - start

        one(0)  # warm up
        results = {}
        for concurrency in sorted({1, args.concurrency}):
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                latencies = list(pool.map(one, range(args.requests)))
            results[concurrency] = (latencies, args.requests / (time.perf_counter() - started))

        import websockets

        async def ws_ttft():
            values = []
            async with websockets.connect(
                stack.ws_url + "/ws/v1/infer", additional_headers={"Authorization": f"Bearer {key}"}, max_size=None
            ) as ws:
                await ws.recv()
                for _ in range(args.requests):
                    start = time.perf_counter()
                    await ws.send(
                        json.dumps(
                            {
                                "type": "infer",
                                "prompt": "What is in this picture?",
                                "image": image_b64,
                                "max_tokens": args.max_tokens,
                            }
                        )
                    )
                    first = None
                    while True:
                        frame = json.loads(await ws.recv())
                        if frame["type"] == "error":
                            raise RuntimeError(f"the websocket answered an error: {frame}")
                        if frame["type"] == "token" and first is None:
                            first = time.perf_counter() - start
                        if frame["type"] in ("done", "error"):
                            break
                    if first is None:
                        raise RuntimeError("the websocket answered without a token frame")
                    values.append(first)
            return values

        websocket_ttft = asyncio.run(ws_ttft())
    finally:
        stack.stop()

    engine_rps = 1 / statistics.mean(engine_latency)
    print(f"\nSightline end-to-end benchmark  (model: {model}; tiny random model => answers are noise)")
    print(
        f"workers: {args.workers} (each {settings.INFERENCE_MAX_BATCH} threads feeding one batch scheduler, "
        f"gathering window {settings.INFERENCE_BATCH_WAIT_MS} ms), heartbeat settings: {production}"
    )
    print(
        f"requests per run: {args.requests}, max_tokens: {args.max_tokens}, "
        f"mean completion tokens: {statistics.mean(engine_tokens):.1f}, device: {engine.device}, "
        f"{args.torch_threads} torch thread(s) per process, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"\nengine direct (1 stream)        {engine_rps:7.2f} req/s   {fmt(engine_latency)}")
    for concurrency, (latencies, rps) in results.items():
        print(f"platform, concurrency {concurrency:<3}      {rps:7.2f} req/s   {fmt(latencies)}")
    if args.concurrency > args.workers:
        print(
            f"  (concurrency {args.concurrency} against {args.workers} worker(s): queries share batches, so those "
            "latencies include batching, not only the platform's overhead; the engine line is one query at a time)"
        )
    latencies_1 = results[1][0]
    overhead = pct(latencies_1, 50) - pct(engine_latency, 50)
    print(
        f"\nplatform overhead per request (concurrency 1, p50): {overhead * 1000:.1f} ms "
        f"(ratio platform/engine {pct(latencies_1, 50) / pct(engine_latency, 50):.2f}x)"
    )
    print(f"time to first token: engine {fmt(engine_ttft)}")
    print(f"                     websocket {fmt(websocket_ttft)}")
    print(f"first-token overhead (p50): {(pct(websocket_ttft, 50) - pct(engine_ttft, 50)) * 1000:.1f} ms")
    print(f"\n(logs of the web and worker processes: {log_dir})")


if __name__ == "__main__":
    main()
