"""The usage rollup's one-statement write (INSERT .. ON CONFLICT DO UPDATE, on the worker's path to
every answer) against the ORM's read-lock-write it replaced: the same rows from the same outcomes,
on PostgreSQL (this suite's database) and on SQLite (the embedded default's, in a process of its own)."""

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from tests.conftest import REPO

FIELDS = (
    "requests",
    "succeeded",
    "failed",
    "rejected",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms_total",
    "latency_histogram",
    "spend",
)

# (succeeded, milliseconds, prompt tokens, completion tokens, cost): first rows, added rows, every
# histogram bucket's neighbourhood, failures (no latency), free and priced queries.
OUTCOMES = [
    (True, 30, 10, 5, Decimal("0.000012345")),
    (True, 30, 11, 6, Decimal("0")),
    (False, 90_000, None, None, Decimal("0")),
    (True, 120, 200, 32, Decimal("1.5")),
    (True, 5000, 1, 1, Decimal("0.000000001")),
    (False, 10, 7, 3, Decimal("0.25")),
    (True, 999_999, 3, 4, Decimal("2")),
]


def compare() -> list[str]:
    """Apply OUTCOMES to two keys' rollups, one through each path; return the differences."""
    from accounts import services
    from inference import usage
    from inference.models import Query, UsageDaily

    tenant = services.create_tenant(f"Rollups {os.getpid()}", slug=f"rollups-{os.getpid()}")
    upserted, _ = services.create_api_key(tenant, "one statement")
    ormed, _ = services.create_api_key(tenant, "orm")
    created = datetime.now(UTC).replace(microsecond=0)
    for endpoint in (Query.Endpoint.GLM_INFER, Query.Endpoint.CHAT_COMPLETIONS):
        for ok, ms, prompt, completion, cost in OUTCOMES:
            for key, write in ((upserted, usage._upsert_outcome), (ormed, usage._orm_outcome)):
                query = Query(
                    tenant_id=tenant.pk,
                    api_key_id=key.pk,
                    model="glm-rollup",
                    endpoint=endpoint,
                    status=Query.Status.SUCCEEDED if ok else Query.Status.FAILED,
                    created_at=created,
                    started_at=created,
                    finished_at=created + timedelta(milliseconds=ms),
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    cost=cost,
                )
                write(query, succeeded=ok, latency_ms=query.total_seconds * 1000 if ok else 0)
    differences = []
    for endpoint in (Query.Endpoint.GLM_INFER, Query.Endpoint.CHAT_COMPLETIONS):
        one = UsageDaily.objects.get(api_key=upserted, endpoint=endpoint)
        other = UsageDaily.objects.get(api_key=ormed, endpoint=endpoint)
        for field in FIELDS:
            if getattr(one, field) != getattr(other, field):
                differences.append(f"{endpoint} {field}: {getattr(one, field)!r} != {getattr(other, field)!r}")
        if one.requests != len(OUTCOMES) or sum(one.latency_histogram) != sum(ok for ok, *_ in OUTCOMES):
            differences.append(f"{endpoint}: {one.requests} requests, histogram {one.latency_histogram}")
    return differences


@pytest.mark.django_db
def test_the_one_statement_rollup_equals_the_orm_on_postgresql():
    from django.db import connection

    assert connection.vendor == "postgresql"
    assert compare() == []


def test_the_one_statement_rollup_equals_the_orm_on_sqlite(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["SIGHTLINE_VAR_DIR"] = str(tmp_path / "var")
    manage = [sys.executable, str(REPO / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], cwd=REPO, env=env, check=True, timeout=120)
    script = (
        "from django.db import connection; assert connection.vendor == 'sqlite', connection.vendor; "
        "from tests.test_rollups import compare; print('DIFFERENCES', compare())"
    )
    result = subprocess.run(
        [*manage, "shell", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DIFFERENCES []" in result.stdout, result.stdout + result.stderr
