"""Where a request's time goes on the production stack at concurrency 1: a timeline from the query
rows and the client's clock, the bare engine beside it, and py-spy's CPU samples of the web and
worker processes.

    .venv/bin/python bench/profile_path.py [--requests 150] [--max-tokens 32] [--rate 200]
        [--image sample|photo] [--torch-threads 1] [--no-py-spy]

It starts the production stack as bench/throughput.py does (Uvicorn + a Celery worker + Redis +
PostgreSQL; the database `sightline_bench` or `BENCH_DB`, Redis database `BENCH_REDIS_DB`),
sends `POST /v1/glm/infer` one at a time, then as many again while `py-spy record --gil` samples
both processes (py-spy must be allowed to read them: root, or ptrace permitted), and prints, per
request at p50 (from the first, unprofiled pass):

  web in      the client's send -> the row's created_at, which is the admission's time (the body
              read and parsed, the key looked up, the input checked)
  to worker   created_at -> started_at (the price and the quota script, image checks and PNG
              encoding, the INSERTs, Celery's dispatch through Redis, the worker's claim)
  first token started_at -> first_token_at (the row and its images read, PNG decoded, the
              scheduler's gathering window, template, prefill)
  decode      first_token_at -> finished_at
  web out     finished_at -> the client has the answer (the row written, settlement, the finished
              signal, the row read again, the response)

and from the second pass each process's time with the GIL held per request: by where the
innermost frame is (this repository, each library, the standard library) and by this
repository's functions (inclusive). The model is the tiny random one (its answers are noise).
"""

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from _common import (
    BENCH_DATABASE_URL,
    BENCH_REDIS_DB,
    fresh_database,
    pct,
    photo_jpeg,
    stop_on_sigterm,
    torch_threads_env,
)
from PIL import Image
from throughput import PROMPT, Http, closed_loop, json_client, make_key, mime_of, multipart

SITE = "site-packages/"


REPO_PACKAGES = {"inference", "accounts", "config", "tests", "bench", "manage.py"}


def frame_name(frame: str) -> tuple[str, str]:
    """py-spy's 'function (path:line)' -> (name, where): where is 'repo', a library's name or
    'stdlib' (py-spy shortens paths to the package's: 'inference/runner.py', 'django/db/...')."""
    function, _, location = frame.rpartition(" (")
    path = location.rstrip(")").rsplit(":", 1)[0]
    if SITE in path:
        path = path.split(SITE, 1)[1]
    top = path.split("/", 1)[0]
    if top in REPO_PACKAGES:
        return f"{function} ({path})", "repo"
    module = top.removesuffix(".py")
    if module in sys.stdlib_module_names or module.startswith("<") or path.startswith("/"):
        return function, "stdlib"
    return function, module


def read_profile(path: Path):
    """py-spy's raw output: one 'frame;frame;...;leaf count' line per distinct stack. Returns the
    samples, this repository's functions inclusive of what they call, and the samples by where
    the innermost frame is (this repository, a library, the standard library)."""
    inclusive, by_place, total = Counter(), Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_name(frame) for frame in stack.split(";") if frame.strip()]
        if not frames:
            continue
        n = int(count)
        total += n
        for name in {name for name, place in frames if place == "repo"}:
            inclusive[name] += n
        by_place[frames[-1][1]] += n
    return total, inclusive, by_place


def print_profile(name: str, path: Path, rate: int, requests: int, top: int) -> None:
    if not path.exists():
        print(f"\n{name}: no profile ({path} missing)")
        return
    total, inclusive, by_place = read_profile(path)
    per = 1000 / rate / max(requests, 1)  # ms per request that one sample stands for
    print(f"\n{name}: {total} samples at {rate}/s = {total * per:.1f} ms per request with the GIL held")
    print(
        "  by where the innermost frame is:  "
        + ",  ".join(f"{place} {count * per:.1f} ms" for place, count in by_place.most_common(10))
    )
    print("  this repository's functions, inclusive:")
    for frame, count in inclusive.most_common(top):
        print(f"    {count * per:7.2f} ms  {frame}")


PROCESSES = ("web", "bench0")


def spy(pid: int, out: Path, rate: int) -> subprocess.Popen:
    """py-spy recording the thread holding the GIL (Python's own work; native work that releases
    the GIL, such as torch's kernels, is not sampled)."""
    argv = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--gil"]
    argv += ["--rate", str(rate), "--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--no-py-spy", action="store_true", help="only the timeline")
    parser.add_argument("--image", choices=("sample", "photo"), default="sample", help="as bench/throughput.py's")
    parser.add_argument("--torch-threads", type=int, default=1, help="as bench/throughput.py's")
    args = parser.parse_args()
    stop_on_sigterm()
    threads_env = torch_threads_env(args.torch_threads)

    os.environ["DATABASE_URL"] = BENCH_DATABASE_URL
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.conf import settings

    from inference.engine import Engine, EngineRequest, SamplingParams
    from inference.models import Query
    from inference.samples import sample_png
    from tests.stack import Stack

    model = os.environ.get("INFERENCE_MODEL") or str(settings.TINY_MODEL_DIR)
    png = sample_png() if args.image == "sample" else photo_jpeg()
    fresh_database()
    production = {
        name: str(getattr(settings, name))
        for name in ("WORKER_HEARTBEAT_SECONDS", "WORKER_HEARTBEAT_TTL", "SWEEP_INTERVAL_SECONDS")
    }
    log_dir = Path(tempfile.mkdtemp(prefix="sightline-profile-"))
    stack = Stack(log_dir, database=BENCH_DATABASE_URL, INFERENCE_MODEL=model, **production, **threads_env)
    stack.redis_url = stack.redis_url.rsplit("/", 1)[0] + f"/{BENCH_REDIS_DB}"
    stack.env["REDIS_URL"] = stack.redis_url
    key = make_key(stack.env)
    stack.start_web()
    stack.start_worker("bench0")
    timeline: list = []
    profiled: list = []
    try:
        stack.wait_ready(workers=1)
        form, content_type = multipart({"prompt": PROMPT, "max_tokens": str(args.max_tokens)}, png)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
        one, close = json_client(stack.port, "/v1/glm/infer", form, headers)()
        for _ in range(5):
            one()
        close()

        def timed(into: list):
            def make():
                connection = Http(stack.port)

                def request():
                    sent = time.time()
                    response = connection.request("/v1/glm/infer", form, headers)
                    payload = response.read()
                    received = time.time()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
                    answer = json.loads(payload)
                    into.append((sent, received, answer["query_id"]))
                    return {"latency": received - sent, "tokens": answer["usage"]["completion_tokens"]}

                return request, connection.close

            return make

        # The timeline without a profiler attached (py-spy takes CPU of its own on a small machine).
        wall, outcomes = closed_loop(timed(timeline), 1, args.requests)
        if not args.no_py_spy:
            spies = [spy(stack.processes[name].pid, log_dir / f"py-spy-{name}.txt", args.rate) for name in PROCESSES]
            time.sleep(1.0)  # attached
            try:
                closed_loop(timed(profiled), 1, args.requests)
            finally:
                for process in spies:
                    process.send_signal(signal.SIGINT)  # py-spy writes what it has
                for process in spies:
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()
    finally:
        stack.stop()
    errors = [outcome for outcome in outcomes if isinstance(outcome, Exception)]

    rows = {
        str(row.pk): row
        for row in Query.objects.filter(pk__in=[query_id for _, _, query_id in timeline]).only(
            "created_at", "started_at", "first_token_at", "finished_at"
        )
    }
    segments = defaultdict(list)
    for sent, received, query_id in timeline:
        row = rows[query_id]
        created, started = row.created_at.timestamp(), row.started_at.timestamp()
        first, finished = row.first_token_at.timestamp(), row.finished_at.timestamp()
        segments["web in"].append(created - sent)
        segments["to worker"].append(started - created)
        segments["first token"].append(first - started)
        segments["decode"].append(finished - first)
        segments["web out"].append(received - finished)
        segments["total"].append(received - sent)

    # The bare engine, one at a time, on the same conversation (in this process, the stack stopped).
    engine = Engine.load(model)
    picture = Image.open(io.BytesIO(png)).convert("RGB")  # as the web tier normalises it
    picture.thumbnail((settings.MAX_IMAGE_SIDE, settings.MAX_IMAGE_SIDE), Image.Resampling.LANCZOS)
    request = EngineRequest(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        images=[picture],
        sampling=SamplingParams(max_new_tokens=args.max_tokens),
    )
    engine.generate(request)
    bare_first, bare_total = [], []
    for _ in range(min(args.requests, 60)):
        start = time.perf_counter()
        first = None
        for _piece in engine.stream(request):
            first = first or time.perf_counter() - start
        bare_total.append(time.perf_counter() - start)
        bare_first.append(first)

    print(
        f"\nProduction stack, concurrency 1, {len(timeline)} requests in {wall:.1f} s ({len(errors)} errors); "
        f"max_tokens {args.max_tokens}; {len(png)}-byte {mime_of(png)} ({args.image}); "
        f"load average {os.getloadavg()[0]:.2f}; {args.torch_threads} torch thread(s) per process"
    )
    print("  segment        p50 ms   mean ms")
    for name, values in segments.items():
        print(f"  {name:<12} {pct(values, 50) * 1000:8.1f}  {sum(values) / len(values) * 1000:8.1f}")
    print(
        f"  bare engine: first piece p50 {pct(bare_first, 50) * 1000:.1f} ms, whole answer p50 "
        f"{pct(bare_total, 50) * 1000:.1f} ms"
    )
    print(f"  overhead p50 (total - bare engine): {(pct(segments['total'], 50) - pct(bare_total, 50)) * 1000:.1f} ms")
    if not args.no_py_spy:
        print(f"\nCPU with the GIL held, per request ({len(profiled)} requests under py-spy --gil):")
        print_profile("web process", log_dir / "py-spy-web.txt", args.rate, len(profiled), args.top)
        print_profile("worker process", log_dir / "py-spy-bench0.txt", args.rate, len(profiled), args.top)
    print(f"\n(logs and raw profiles: {log_dir})")


if __name__ == "__main__":
    main()
