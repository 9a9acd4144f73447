"""Reliability against real processes: a web process killed mid-admission, a Redis restart that
loses everything, and a Redis pause. The rows in PostgreSQL are the truth; Redis is rebuilt from them."""

import ast

from tests.conftest import REPO


def test_accounts_never_imports_the_inference_runtime():
    """accounts.quotas reaches Redis through config/redis.py, not through inference.workers (which
    imports inference.runner, which imports accounts.quotas: an import cycle between the apps)."""
    runtime = {"inference.workers", "inference.runner", "inference.tasks", "inference.dispatch"}
    found = []
    for path in (REPO / "accounts").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
                found += [f"{path.name}: {name}" for name in names & runtime]
            elif isinstance(node, ast.Import):
                found += [f"{path.name}: {alias.name}" for alias in node.names if alias.name in runtime]
    assert found == []
