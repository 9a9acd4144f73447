"""What the benchmarks share: the repository on sys.path, a fresh benchmark database, percentiles."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
BENCH_DB = "sightline_bench"
BENCH_DATABASE_URL = f"{PG}/{BENCH_DB}"


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
