"""The README's serve command, run as a user would: `make serve` on the embedded default (SQLite,
no Redis), then the `curl` line it prints. The tiny model's answer is noise; the test checks that
there is one, that `code` is 0, and that the row is in the SQLite database."""

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port


@pytest.fixture
def served(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "INFERENCE_MODEL"}}
    env["SIGHTLINE_VAR_DIR"] = str(tmp_path / "var")
    venv = Path(sys.prefix)
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        ["make", "serve", f"VENV={venv}", f"PORT={port}"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for _ in range(240):  # bounded: the model is built and loaded first
            if process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if json.load(response)["model_loaded"]:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        log.seek(0)
        output = log.read()
        assert process.poll() is None, f"make serve exited:\n{output}"
        yield output, tmp_path / "var"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def test_make_serve_prints_a_curl_line_that_works(served):
    output, var_dir = served
    curl_lines = [line.strip() for line in output.splitlines() if line.strip().startswith("curl ")]
    assert len(curl_lines) == 1, output
    assert "its answers are noise" in output
    result = subprocess.run(
        shlex.split(curl_lines[0]) + ["-w", "\n%{http_code}"], capture_output=True, text=True, timeout=60
    )
    body_text, status = result.stdout.rsplit("\n", 1)
    assert status == "200", result.stdout
    body = json.loads(body_text)
    assert body["code"] == 0 and body["result"]
    with sqlite3.connect(var_dir / "sightline.sqlite3") as db:
        row = db.execute(
            "SELECT status, answer, completion_tokens FROM inference_query WHERE id = ?",
            (body["query_id"].replace("-", ""),),
        ).fetchone()
    assert row is not None
    assert row[0] == "succeeded" and row[1] == body["result"] and row[2] > 0
