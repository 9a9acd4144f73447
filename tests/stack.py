"""The production stack for tests, as real processes: Uvicorn serving config.asgi (`manage.py serve`), and Celery
workers (`celery -A config worker`: threads feeding a batch scheduler), on the test PostgreSQL database and a Redis
database of their own. The model is the tiny random one (its answers are noise)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import REPO, free_port

REDIS_TEST_DB = 15
# Stacks of one test session share the database, so they are one deployment: one key prefix.
SESSION_PREFIX = f"sightline-test-{uuid.uuid4().hex[:8]}"


def database_url() -> str:
    from django.conf import settings

    db = settings.DATABASES["default"]
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{db['USER']}{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def redis_base_url() -> str:
    return os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]


@contextmanager
def session_sweepers_kept_off(timeout: float = 30):
    """Hold the sweeper lock of this session's stacks while the block runs. Their workers sweep the
    test database every second (the session's live stack stays up between tests), and would end a
    test's made-up ``running`` rows of dead workers before the test's own sweep: the lock keeps them
    off as it keeps a second worker off (inference/workers.py, ``duty_lock``)."""
    import redis

    lock = redis.Redis.from_url(f"{redis_base_url()}/{REDIS_TEST_DB}").lock(
        f"{SESSION_PREFIX}:sweeper", timeout=timeout + 60, thread_local=False
    )
    if not lock.acquire(blocking=True, blocking_timeout=timeout):
        raise RuntimeError("a stack's sweeper held its lock for longer than a test may wait")
    try:
        yield
    finally:
        lock.release()


class Stack:
    """A web process and any number of workers sharing one queue, key prefix and Redis database."""

    def __init__(self, log_dir: Path, database: str | None = None, **extra_env):
        self.log_dir = log_dir
        self.tag = uuid.uuid4().hex[:8]
        self.redis_url = f"{redis_base_url()}/{REDIS_TEST_DB}"
        self.queue = f"infer.test-{self.tag}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
            "DATABASE_URL": database or database_url(),
            "REDIS_URL": self.redis_url,
            "INFERENCE_QUEUE": self.queue,
            "REDIS_KEY_PREFIX": SESSION_PREFIX,
            "WORKER_HEARTBEAT_SECONDS": "0.5",
            "WORKER_HEARTBEAT_TTL": "3",
            "SWEEP_INTERVAL_SECONDS": "1",
            # Stacks of a session share the database but each has a queue of its own: a sweeper would
            # take another stack's waiting query for one its web process never dispatched.
            "UNDISPATCHED_QUEUED_SECONDS": "600",
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.port: int | None = None
        self._argv: dict[str, list[str]] = {}
        self._env: dict[str, dict] = {}  # what a process adds to the stack's environment (start_worker's env)
        self._supervised: dict[str, threading.Event] = {}
        self._lock = threading.Lock()  # a supervisor's restart against kill()/stop()
        self.restarts: dict[str, int] = {}

    # --- processes -------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], mode: str = "w", env: dict | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", mode)  # noqa: SIM115 - owned by the process
        if env is not None:
            self._env[name] = env
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**self.env, **self._env.get(name, {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        self._argv[name] = argv
        return process

    def supervise(self, name: str, every: float = 0.2) -> None:
        """Act as production's supervisor (systemd ``Restart=always``, a Kubernetes pod restart, the
        Procfile runner) for process ``name``: whenever it exits on its own, start it again with the
        same command line, its log appended to. ``restarts[name]`` counts the restarts; kill() and
        stop() end the supervision first."""
        stopped = threading.Event()
        self._supervised[name] = stopped
        self.restarts.setdefault(name, 0)

        def watch():
            while not stopped.wait(every):
                with self._lock:
                    process = self.processes.get(name)
                    if stopped.is_set() or process is None or process.poll() is None:
                        continue
                    self._spawn(name, self._argv[name], mode="a")
                    self.restarts[name] += 1

        threading.Thread(target=watch, name=f"supervise-{name}", daemon=True).start()

    def start_web(self) -> int:
        self.port = free_port()
        self._spawn("web", [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(self.port)])
        return self.port

    def start_worker(self, name: str, queue: str | None = None, **env) -> subprocess.Popen:
        """A Celery worker on ``queue`` (default: the stack's), its environment the stack's plus ``env``
        (e.g. INFERENCE_MODEL_NAME: which registered model it serves)."""
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "-Q",
            queue or self.queue,
            "-n",
            f"{name}-{self.tag}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
        ]
        return self._spawn(name, argv, env=env)

    def kill(self, name: str, sig=signal.SIGKILL, timeout: float = 30) -> None:
        """Signal a process's whole group and wait for it (its supervision ends first); forgotten only
        once it is gone, so a failed attempt (a timeout) can be followed by a harder one."""
        with self._lock:
            if name in self._supervised:
                self._supervised.pop(name).set()
            process = self.processes[name]
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # its group is gone already
            pass
        process.wait(timeout=timeout)
        with self._lock:
            self.processes.pop(name, None)

    def stop(self, grace: float = 30) -> None:
        """Stop every process: SIGTERM, then SIGKILL for any still alive after `grace` seconds.
        One that cannot be stopped does not keep the others running; the first error is raised at the end."""
        errors: list[BaseException] = []
        for name in list(self.processes):
            try:
                self.kill(name, signal.SIGTERM, timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    self.kill(name, signal.SIGKILL)
                except BaseException as exc:  # noqa: BLE001 - go on with the others, raise below
                    errors.append(exc)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text()

    # --- http ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def get_json(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)

    def wait_web(self, timeout: float = 60) -> None:
        """Wait (bounded) until the web process answers /health at all (no worker needed)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.processes["web"].poll() is not None:
                raise RuntimeError(f"web exited early:\n{self.log('web')}")
            try:
                if self.get_json("/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"web did not answer /health within {timeout} s:\n{self.log('web')}")
            time.sleep(0.2)

    def wait_ready(self, workers: int = 1, timeout: float = 120, queues: dict[str, int] | None = None) -> dict:
        """Wait (bounded) until /health/ready sees `workers` live workers with the model loaded (or,
        given `queues`, that many on each of those queues)."""
        deadline = time.monotonic() + timeout
        body: dict = {}
        wanted = queues or {self.queue: workers}
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited early:\n{self.log(name)}")
            try:
                status, body = self.get_json("/health/ready")
                seen = body.get("queues", {})
                if status == 200 and all(seen.get(q, {}).get("workers", 0) >= n for q, n in wanted.items()):
                    return body
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"stack not ready: {body}\n" + "\n".join(self.log(n) for n in self.processes))


def post_json_with_headers(url: str, body: dict, key: str) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.load(error), error.headers


def post_json(url: str, body: dict, key: str) -> tuple[int, dict]:
    status, answer, _ = post_json_with_headers(url, body, key)
    return status, answer


def get_json(url: str, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@contextmanager
def running_stack(log_dir: Path, *, workers: tuple[str, ...] = ("w1",), **extra_env):
    """A started Stack (web + ``workers``), ready, stopped on the way out."""
    stack = Stack(log_dir, **extra_env)
    stack.start_web()
    for name in workers:
        stack.start_worker(name)
    try:
        stack.wait_ready(workers=len(workers))
        yield stack
    finally:
        stack.stop()


class EngineServer:
    """A real OpenAI-compatible engine server for the ``openai`` backend: ``transformers serve``
    (transformers' ``serving`` extra) serving the tiny model from its folder on the CPU, as a process
    group of its own that tests can kill (SIGKILL: the engine dying) and start again on the same port.
    It serves the model under its folder's path, the id a worker expects (INFERENCE_MODEL)."""

    def __init__(self, model_dir: Path, log_dir: Path, *, port: int | None = None, max_model_len: int = 1024):
        self.model_dir = str(model_dir)
        self.log_dir = log_dir
        self.port = port or free_port()
        self.max_model_len = max_model_len
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "EngineServer":
        argv = [
            str(Path(sys.executable).with_name("transformers")),
            "serve",
            self.model_dir,
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--log-level",
            "warning",
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        log = open(self.log_dir / f"engine-{self.port}.log", "a")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        return self

    def log(self) -> str:
        return (self.log_dir / f"engine-{self.port}.log").read_text()

    def wait_ready(self, timeout: float = 120) -> None:
        """Wait (bounded) until its /health is 200 and /v1/models lists the model."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"the engine server exited:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    healthy = response.status == 200
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as response:
                    served = [m["id"] for m in json.load(response)["data"]]
                if healthy and self.model_dir in served:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the engine server was not ready within {timeout} s:\n{self.log()}")

    def kill(self, sig=signal.SIGKILL) -> None:
        """Signal its whole process group (the API server and its model's process) and wait for it."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)


def wait_finished(query_id, timeout=120):
    """The query once it has ended (bounded wait); its row from the test database."""
    from inference.models import Query

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        query = Query.objects.get(pk=query_id)
        if query.is_finished:
            return query
        time.sleep(0.1)
    raise AssertionError(f"query {query_id} did not finish: {Query.objects.get(pk=query_id).status}")
