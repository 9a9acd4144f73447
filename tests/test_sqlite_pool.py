"""The embedded default's SQLite connections are handed from thread to thread (config/sqlite_pool):
a request's thread gives its connection back when the request ends and the next thread takes it,
never while a transaction is open on it, and never to two threads at once."""

import os
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _in_thread(function):
    box = {}

    def run():
        from django.db import close_old_connections

        try:
            box["value"] = function()
        finally:
            close_old_connections()  # what the end of a request does (CONN_MAX_AGE 0): give it back

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return box.get("value")


def check() -> list[str]:
    """Run in a process on the embedded default's settings; returns what went wrong."""
    from django.db import connection, transaction

    problems = []
    if connection.vendor != "sqlite" or connection.settings_dict["CONN_MAX_AGE"] != 0:
        return [f"not the embedded default's database: {connection.vendor} {connection.settings_dict}"]

    def handle():
        connection.ensure_connection()
        return connection.connection

    first = _in_thread(handle)
    second = _in_thread(handle)
    if first is not second:
        problems.append("a connection given back by one thread was not reused by the next")

    # Two threads at once never share one.
    both, ready, release = [], threading.Barrier(2), threading.Event()

    def hold():
        both.append(handle())
        ready.wait()
        release.wait()

    threads = [threading.Thread(target=_in_thread, args=(hold,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    while len(both) < 2:
        threading.Event().wait(0.01)
    release.set()
    for thread in threads:
        thread.join()
    if both[0] is both[1]:
        problems.append("two threads held the same connection at once")

    # A transaction left open is rolled back before the connection is handed on.
    _in_thread(lambda: handle().execute("CREATE TABLE pool_probe (x integer)"))

    def leave_open():
        raw = handle()
        raw.execute("BEGIN")
        raw.execute("INSERT INTO pool_probe VALUES (1)")
        return raw.in_transaction

    if not _in_thread(leave_open):
        problems.append("the test did not open a transaction")
    if _in_thread(lambda: handle().in_transaction):
        problems.append("a connection was handed on inside a transaction")
    if _in_thread(lambda: handle().execute("SELECT count(*) FROM pool_probe").fetchone()[0]):
        problems.append("a transaction left open was committed, not rolled back")

    # Closed inside atomic (as after an error mid-transaction): the wrapper still holds it, so it is
    # closed for good, not handed to another thread.
    def close_in_atomic():
        with transaction.atomic():
            raw = handle()
            connection.close()
        return raw

    closed = _in_thread(close_in_atomic)
    taken = _in_thread(handle)
    if closed is taken:
        problems.append("a connection closed inside atomic was handed to another thread")
    return problems


def test_connections_are_reused_across_threads_and_never_shared(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["SIGHTLINE_VAR_DIR"] = str(tmp_path / "var")
    manage = [sys.executable, str(REPO / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], cwd=REPO, env=env, check=True, timeout=120)
    script = "from tests.test_sqlite_pool import check; print('PROBLEMS', check())"
    result = subprocess.run(
        [*manage, "shell", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PROBLEMS []" in result.stdout, result.stdout + result.stderr
