"""What the benchmarks share: the repository on sys.path, a fresh benchmark database, percentiles."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
BENCH_DB = os.environ.get("BENCH_DB", "sightline_bench")
BENCH_DATABASE_URL = f"{PG}/{BENCH_DB}"
# The Redis database the benchmarks' stacks use (BENCH_REDIS_DB; 14 unless told).
BENCH_REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "14"))
# With DATABASE_URL or REDIS_URL set, settings want a strong SECRET_KEY: the benchmarks' own unless
# one is set (every process they start inherits it).
BENCH_SECRET_KEY = "sightline-benchmark-key-not-for-production-0123456789abcdefghij"
os.environ.setdefault("SECRET_KEY", BENCH_SECRET_KEY)


def pct(values, q):
    """The q-th percentile by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


P99_SAMPLES = 200  # below this, a nearest-rank p99 is just the maximum: print it as such


def spread(values, scale: float = 1.0, unit: str = "ms", width: int = 8) -> str:
    """ "p50 … p99 …" with enough samples for a p99, else "p50 … max …" (never a p99 that is the max)."""
    p50 = pct(values, 50) * scale
    if len(values) >= P99_SAMPLES:
        return f"p50 {p50:{width}.1f} {unit}   p99 {pct(values, 99) * scale:{width}.1f} {unit}"
    top = max(values) * scale
    return f"p50 {p50:{width}.1f} {unit}   max {top:{width}.1f} {unit} (n={len(values)} < {P99_SAMPLES}: no p99)"


def fresh_database(env: dict | None = None) -> str:
    """Drop and create the benchmark database, migrate it, and return its URL."""
    subprocess.run(["psql", f"{PG}/postgres", "-qc", f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)"], check=True)
    subprocess.run(["psql", f"{PG}/postgres", "-qc", f"CREATE DATABASE {BENCH_DB}"], check=True)
    env = {**os.environ, **(env or {}), "DATABASE_URL": BENCH_DATABASE_URL}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=REPO, env=env, check=True)
    return BENCH_DATABASE_URL


def stop_on_sigterm() -> None:
    """SIGTERM (``timeout``, a supervisor) ends the benchmark like Ctrl-C: its ``finally`` blocks
    stop the servers and workers it started instead of leaving them running."""
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def torch_threads_env(threads: int) -> dict:
    """The environment that gives the processes a benchmark starts ``threads`` torch CPU threads,
    and the same for this process. On a small shared CPU, torch's threads waiting for each other
    while other processes hold the cores make runs 10x slower at random; one thread each gives
    comparable figures. (On a GPU it changes nothing of substance.)"""
    import torch

    torch.set_num_threads(threads)
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def photo_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A photo-like JPEG (smooth colour fields, sensor-like noise, quality 90): unlike the flat
    drawing of ``inference.samples``, it costs what a real picture costs to decode, scale and
    store as PNG. The same bytes every run."""
    import io

    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / 50), 128 + 90 * np.cos(y / 40), 128 + 60 * np.sin((x + y) / 70)], -1)
    pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()
