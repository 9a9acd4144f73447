"""Throughput under load: closed-loop clients at several concurrency levels against

  production  the production stack (Uvicorn + a Celery worker + Redis + PostgreSQL), started here
              as the tests start it (tests/stack.py);
  embedded    the embedded default (`manage.py serve` with SQLite, no Redis, the worker thread
              in the web process);
  engine      the engine alone, in this process: batched (its Scheduler, as a worker runs it)
              and unbatched (one request at a time behind a lock), in the same run;
  wrapper     the seed article's shape (bench/seed_wrapper.py: FastAPI + Uvicorn, one lock,
              `POST /infer`) around the same engine.

    .venv/bin/python bench/throughput.py [--levels 1,4,8,16,32] [--requests-per-level 24]
        [--max-tokens 32] [--targets production,embedded,engine,wrapper] [--workers 1]
        [--image sample|photo] [--torch-threads 1]
        [--backend openai --engine-url http://127.0.0.1:8001/v1]

Each level runs max(--requests-per-level, 2 x concurrency) requests: every client sends its next
request as soon as its last one is answered. The HTTP targets are asked twice per level: the
latency pass uses `POST /v1/glm/infer` (multipart, the shape the wrapper also takes), the
first-token pass streams `POST /v1/chat/completions` (SSE, thinking off so the prompt is the same)
and times the first text. The engine's figures come from one pass (it streams). Printed per level:
requests/s, output tokens/s, p50 and p99 latency (nearest rank: with fewer than 200 requests the
p99 is the slowest one), p50 and p99 time to first token, and each level's requests/s against
concurrency 1; then a summary.

It recreates the PostgreSQL database `sightline_bench` (`BENCH_DB`) and uses Redis database 14
(`BENCH_REDIS_DB`); the embedded default gets a SQLite file in a temporary folder. The model is
the tiny random model (`manage.py build_tiny_model`) unless INFERENCE_MODEL is set: its answers
are noise and its speed on a CPU says nothing about GLM-4.6V-Flash on a GPU; the figures compare
the serving paths around the same engine.

`--backend openai --engine-url URL` runs the production and embedded stacks against an
OpenAI-compatible engine server (vLLM, SGLang) by passing INFERENCE_BACKEND and
INFERENCE_ENGINE_URL to them; it needs that backend (issue 12) and stops here without it. The
engine and wrapper targets drive the in-process engine and are skipped then.
"""

import argparse
import base64
import http.client
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    BENCH_DATABASE_URL,
    BENCH_REDIS_DB,
    REPO,
    fresh_database,
    pct,
    photo_jpeg,
    stop_on_sigterm,
    torch_threads_env,
)

PROMPT = "What is in this picture?"
TARGETS = ("engine", "production", "embedded", "wrapper")
MAKE_KEY = """
from accounts import services
tenant = services.create_tenant(
    "Bench", slug="bench", requests_per_minute=None, requests_per_day=None, tokens_per_month=None,
    max_concurrent_requests=None,
)
print("KEY=" + services.create_api_key(tenant, "bench")[1])
"""


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Level:
    concurrency: int
    requests: int
    wall: float = 0.0
    latencies: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    ttfts: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    @property
    def tps(self) -> float:
        return sum(self.tokens) / self.wall if self.wall else 0.0


def closed_loop(make_client, concurrency: int, requests: int):
    """``concurrency`` threads, each with its own client (``make_client()`` -> a callable returning
    one request's figures, and a close function), send ``requests`` requests in all, each its next as
    soon as its last is answered. Returns (wall seconds, [figures or exceptions])."""
    tickets = itertools.count()
    results: list = []
    lock = threading.Lock()
    ready = threading.Barrier(concurrency + 1)

    def client():
        one, close = make_client()
        try:
            ready.wait()
            while next(tickets) < requests:
                try:
                    outcome = one()
                except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                    outcome = exc
                with lock:
                    results.append(outcome)
        finally:
            close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, results


def record(level: Level, outcomes, *, latency=True, ttft=False) -> None:
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            level.errors.append(f"{type(outcome).__name__}: {str(outcome)[:200]}")
            continue
        if latency:
            level.latencies.append(outcome["latency"])
            level.tokens.append(outcome["tokens"])
        if ttft and outcome.get("ttft") is not None:
            level.ttfts.append(outcome["ttft"])


def run_levels(name: str, levels, per_level: int, latency_client, ttft_client=None) -> list[Level]:
    """Every level: a latency pass (``latency_client``; its figures may carry the first-token time
    too), then a first-token pass when ``ttft_client`` is given."""
    out = []
    for concurrency in levels:
        level = Level(concurrency, max(per_level, 2 * concurrency))
        level.wall, outcomes = closed_loop(latency_client, concurrency, level.requests)
        record(level, outcomes, ttft=ttft_client is None)
        if ttft_client is not None:
            _, outcomes = closed_loop(ttft_client, concurrency, level.requests)
            record(level, outcomes, latency=False, ttft=True)
        print(f"  {name:<18} c={concurrency:<3} {level.rps:7.2f} req/s  errors {len(level.errors)}", flush=True)
        out.append(level)
    return out


# --- HTTP clients ---------------------------------------------------------------------------------


def mime_of(picture: bytes) -> str:
    return "image/jpeg" if picture[:3] == b"\xff\xd8\xff" else "image/png"


def multipart(fields: dict, png: bytes) -> tuple[bytes, str]:
    boundary = "sightline-bench-boundary-7f3a9c"
    extension = mime_of(png).split("/")[1]
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="picture.{extension}"\r\n'
        f"Content-Type: {mime_of(png)}\r\n\r\n".encode()
        + png
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Http:
    """One keep-alive connection (a client thread's), reopened when the server closed it."""

    def __init__(self, port: int):
        self.port = port
        self.conn = None

    def request(self, path: str, body: bytes, headers: dict) -> http.client.HTTPResponse:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                self.conn.request("POST", path, body=body, headers=headers)
                return self.conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def json_client(port: int, path: str, body: bytes, headers: dict):
    """A non-streaming request: latency and the answer's completion tokens."""

    def make():
        connection = Http(port)

        def one():
            start = time.perf_counter()
            response = connection.request(path, body, headers)
            payload = response.read()
            latency = time.perf_counter() - start
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
            answer = json.loads(payload)
            return {"latency": latency, "tokens": int(answer["usage"]["completion_tokens"])}

        return one, connection.close

    return make


def sse_client(port: int, path: str, body: bytes, headers: dict):
    """A streamed chat completion: the time to its first text (answer or reasoning), its latency and tokens."""

    def make():
        connection = Http(port)

        def one():
            start = time.perf_counter()
            response = connection.request(path, body, headers)
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
            first, tokens = None, 0
            while True:
                line = response.readline()
                if not line:
                    break
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if first is None and (delta.get("content") or delta.get("reasoning_content")):
                        first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
            response.read()  # the end of the chunked body, so the connection can be used again
            if first is None:
                raise RuntimeError("the stream carried no text")
            return {"latency": time.perf_counter() - start, "tokens": tokens, "ttft": first}

        return one, connection.close

    return make


def sightline_clients(port: int, key: str, png: bytes, max_tokens: int, model_name: str):
    auth = {"Authorization": f"Bearer {key}"}
    form, content_type = multipart({"prompt": PROMPT, "max_tokens": str(max_tokens)}, png)
    infer = json_client(port, "/v1/glm/infer", form, {**auth, "Content-Type": content_type})
    data_uri = f"data:{mime_of(png)};base64," + base64.b64encode(png).decode()
    chat = json.dumps(
        {
            "model": model_name,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_uri}},
                        {"type": "text", "text": PROMPT},
                    ],
                }
            ],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"enable_thinking": False},  # as /v1/glm/infer: the same prompt
        }
    ).encode()
    stream = sse_client(port, "/v1/chat/completions", chat, {**auth, "Content-Type": "application/json"})
    return infer, stream


def warm_up(*makers, times: int = 3) -> None:
    for make in makers:
        one, close = make()
        try:
            for _ in range(times):
                one()
        finally:
            close()


def wait_http(port: int, path: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early:\n{log.read_text()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                connection.close()
                return
            connection.close()
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{path} did not answer 200 within {timeout} s:\n{log.read_text()[-3000:]}")


def make_key(env: dict) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", MAKE_KEY],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return next(line[4:] for line in done.stdout.splitlines() if line.startswith("KEY="))


# --- targets ------------------------------------------------------------------------------------


def bench_engine(args, model: str, png: bytes, batching: dict) -> dict:
    from PIL import Image

    from inference.engine import Engine, EngineRequest, SamplingParams

    # What a worker gets: the picture as the web tier normalised it (RGB, longer side <= MAX_IMAGE_SIDE).
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.thumbnail((args.max_image_side, args.max_image_side), Image.Resampling.LANCZOS)
    engine = Engine.load(model)
    request = EngineRequest(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        images=[image],
        sampling=SamplingParams(max_new_tokens=args.max_tokens),
    )
    one_at_a_time = threading.Lock()
    holding = [0]  # requests in flight: the scheduler's ``pending``, as a worker tells it its queries
    count = threading.Lock()

    def client(locked: bool):
        def make():
            def one():
                start = time.perf_counter()
                first = None
                with count:
                    holding[0] += 1
                if locked:
                    one_at_a_time.acquire()
                try:
                    generation = engine.stream(request)
                    for _ in generation:
                        first = first or time.perf_counter() - start
                finally:
                    if locked:
                        one_at_a_time.release()
                    with count:
                        holding[0] -= 1
                return {
                    "latency": time.perf_counter() - start,
                    "tokens": generation.result.completion_tokens,
                    "ttft": first,
                }

            return one, lambda: None

        return make

    engine.generate(request)  # warm up
    engine.generate(request)
    results = {"engine unbatched": run_levels("engine unbatched", args.levels, args.per_level, client(True))}
    engine.enable_batching(**batching, pending=lambda: holding[0])
    results["engine batched"] = run_levels("engine batched", args.levels, args.per_level, client(False))
    return results


def bench_production(args, model: str, png: bytes, backend_env: dict, model_name: str) -> dict:
    from django.conf import settings

    from tests.stack import Stack

    fresh_database()
    # Production's heartbeat and sweeper settings, not the tests' faster ones.
    production = {
        name: str(getattr(settings, name))
        for name in ("WORKER_HEARTBEAT_SECONDS", "WORKER_HEARTBEAT_TTL", "SWEEP_INTERVAL_SECONDS")
    }
    log_dir = Path(tempfile.mkdtemp(prefix="sightline-throughput-production-"))
    stack = Stack(
        log_dir, database=BENCH_DATABASE_URL, INFERENCE_MODEL=model, **production, **backend_env, **args.threads_env
    )
    stack.redis_url = stack.redis_url.rsplit("/", 1)[0] + f"/{BENCH_REDIS_DB}"
    stack.env["REDIS_URL"] = stack.redis_url
    key = make_key(stack.env)
    stack.start_web()
    for n in range(args.workers):
        stack.start_worker(f"bench{n}")
    try:
        stack.wait_ready(workers=args.workers)
        infer, stream = sightline_clients(stack.port, key, png, args.max_tokens, model_name)
        warm_up(infer, stream)
        levels = run_levels("production", args.levels, args.per_level, infer, stream)
    finally:
        stack.stop()
    print(f"  (logs: {log_dir})")
    return {"production": levels}


def bench_embedded(args, model: str, png: bytes, backend_env: dict, model_name: str) -> dict:
    from tests.conftest import free_port

    var = Path(tempfile.mkdtemp(prefix="sightline-throughput-embedded-"))
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        "SIGHTLINE_VAR_DIR": str(var),
        "INFERENCE_MODEL": model,
        "PYTHONUNBUFFERED": "1",
        **backend_env,
        **args.threads_env,
    }
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)
    key = make_key(env)
    port = free_port()
    log = var / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(port, "/health/ready", process, log)
        infer, stream = sightline_clients(port, key, png, args.max_tokens, model_name)
        warm_up(infer, stream)
        levels = run_levels("embedded", args.levels, args.per_level, infer, stream)
    finally:
        stop(process)
    print(f"  (log and SQLite file: {var})")
    return {"embedded": levels}


def bench_wrapper(args, model: str, png: bytes) -> dict:
    from tests.conftest import free_port

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="sightline-throughput-wrapper-")) / "wrapper.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "seed_wrapper.py"), "--model", model, "--port", str(port)],
            cwd=REPO,
            env={**os.environ, **args.threads_env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(port, "/health", process, log)
        form, content_type = multipart({"prompt": PROMPT, "max_tokens": str(args.max_tokens)}, png)
        infer = json_client(port, "/infer", form, {"Content-Type": content_type})
        warm_up(infer)
        levels = run_levels("wrapper", args.levels, args.per_level, infer)
    finally:
        stop(process)
    return {"wrapper": levels}


def stop(process: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass


# --- report ---------------------------------------------------------------------------------------


def ms(values, q) -> str:
    return f"{pct(values, q) * 1000:8.1f}" if values else f"{'-':>8}"


def print_table(name: str, levels: list[Level]) -> None:
    base = levels[0].rps if levels and levels[0].concurrency == 1 else None
    print(f"\n{name}")
    print("      c      n    req/s  x c=1   out tok/s   p50 ms   p99 ms   TTFT p50   TTFT p99  errors")
    for level in levels:
        ratio = f"{level.rps / base:5.2f}" if base else f"{'-':>5}"
        print(
            f"  {level.concurrency:5d}  {level.requests:5d}  {level.rps:7.2f}  {ratio}  {level.tps:10.1f}"
            f" {ms(level.latencies, 50)} {ms(level.latencies, 99)}   {ms(level.ttfts, 50)}   {ms(level.ttfts, 99)}"
            f"  {len(level.errors):6d}"
        )
        for error in sorted(set(level.errors))[:3]:
            print(f"         error: {error}")


def at(results: dict, name: str, concurrency: int) -> Level | None:
    return next((level for level in results.get(name, []) if level.concurrency == concurrency), None)


def summary(results: dict) -> None:
    print("\nsummary")
    c1, c8 = at(results, "production", 1), at(results, "production", 8)
    if c1 and c8 and c1.rps:
        print(f"  production req/s, c=8 / c=1:  {c8.rps / c1.rps:.2f}x  ({c8.rps:.2f} / {c1.rps:.2f})")
    for engine_name in ("engine unbatched", "engine batched"):
        engine = at(results, engine_name, 1)
        if c1 and engine and c1.latencies and engine.latencies:
            overhead = (pct(c1.latencies, 50) - pct(engine.latencies, 50)) * 1000
            line = f"  platform overhead at c=1, p50 latency, production - {engine_name}: {overhead:6.1f} ms"
            if c1.ttfts and engine.ttfts:
                line += f"   (first token: {(pct(c1.ttfts, 50) - pct(engine.ttfts, 50)) * 1000:+.1f} ms)"
            print(line)
    for concurrency in (1, 8):
        embedded, wrapper = at(results, "embedded", concurrency), at(results, "wrapper", concurrency)
        if embedded and wrapper and wrapper.rps and embedded.latencies and wrapper.latencies:
            print(
                f"  embedded vs wrapper at c={concurrency}: req/s {embedded.rps:.2f} vs {wrapper.rps:.2f} "
                f"({embedded.rps / wrapper.rps:.2f}x), p50 {pct(embedded.latencies, 50) * 1000:.1f} vs "
                f"{pct(wrapper.latencies, 50) * 1000:.1f} ms"
            )
    batched, unbatched = at(results, "engine batched", 8), at(results, "engine unbatched", 8)
    if batched and unbatched and unbatched.rps:
        print(f"  engine at c=8, batched / unbatched req/s: {batched.rps / unbatched.rps:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,8,16,32", help="concurrency levels, comma-separated")
    parser.add_argument(
        "--requests-per-level", dest="per_level", type=int, default=24, help="at least this many per level (2 x c)"
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"any of {','.join(TARGETS)}")
    parser.add_argument("--workers", type=int, default=1, help="Celery workers of the production stack")
    parser.add_argument(
        "--image",
        choices=("sample", "photo"),
        default="sample",
        help="sample: the quickstart's flat 320x240 PNG drawing; photo: a photo-like 640x480 JPEG (_common.photo_jpeg)",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch CPU threads of every process (OMP_NUM_THREADS); see _common"
    )
    parser.add_argument("--backend", choices=("transformers", "openai"), default="transformers")
    parser.add_argument("--engine-url", help="the OpenAI-compatible engine server (--backend openai)")
    args = parser.parse_args()
    stop_on_sigterm()
    args.levels = sorted({int(value) for value in args.levels.split(",") if value.strip()})
    targets = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")

    os.environ["DATABASE_URL"] = BENCH_DATABASE_URL
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.conf import settings

    backend_env = {}
    if args.backend == "openai":
        if not args.engine_url:
            parser.error("--backend openai needs --engine-url")
        if not hasattr(settings, "INFERENCE_BACKEND"):
            sys.exit(
                "--backend openai needs the engine-server backend (issue 12: INFERENCE_BACKEND, "
                "INFERENCE_ENGINE_URL), which this checkout does not have yet."
            )
        backend_env = {"INFERENCE_BACKEND": "openai", "INFERENCE_ENGINE_URL": args.engine_url}
        skipped = [name for name in targets if name in ("engine", "wrapper")]
        if skipped:
            print(f"--backend openai: skipping {', '.join(skipped)} (they drive the in-process engine)")
        targets = [name for name in targets if name not in ("engine", "wrapper")]

    model = os.environ.get("INFERENCE_MODEL") or str(settings.TINY_MODEL_DIR)
    if model == str(settings.TINY_MODEL_DIR) and not (Path(model) / "config.json").exists():
        subprocess.run([sys.executable, "manage.py", "build_tiny_model"], cwd=REPO, check=True, capture_output=True)
    from inference.samples import sample_png

    png = sample_png() if args.image == "sample" else photo_jpeg()
    args.threads_env = torch_threads_env(args.torch_threads)
    args.max_image_side = settings.MAX_IMAGE_SIDE
    batching = {
        "max_batch": settings.INFERENCE_MAX_BATCH,
        "wait_ms": settings.INFERENCE_BATCH_WAIT_MS,
        "max_tokens": settings.INFERENCE_MAX_BATCH_TOKENS,
    }
    load_before = os.getloadavg()
    started = time.perf_counter()
    results: dict = {}
    for name in targets:
        print(f"{name} ...", flush=True)
        if name == "engine":
            results.update(bench_engine(args, model, png, batching))
        elif name == "production":
            results.update(bench_production(args, model, png, backend_env, settings.INFERENCE_MODEL_NAME))
        elif name == "embedded":
            results.update(bench_embedded(args, model, png, backend_env, settings.INFERENCE_MODEL_NAME))
        elif name == "wrapper":
            results.update(bench_wrapper(args, model, png))

    print(f"\nSightline throughput benchmark  (model: {model}; the tiny random model's answers are noise)")
    print(
        f"max_tokens {args.max_tokens}, prompt {PROMPT!r} with a {len(png)}-byte {mime_of(png)} ({args.image}); "
        f"batching: {batching}; backend: {args.backend}; {args.torch_threads} torch thread(s) per process; "
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    print("latency: /v1/glm/infer (wrapper: /infer); TTFT: streamed /v1/chat/completions (engine: its first piece)")
    print("p99 is nearest-rank: with fewer than 200 requests per level it is the slowest request")
    for name, levels in results.items():
        print_table(name, levels)
    summary(results)


if __name__ == "__main__":
    main()
