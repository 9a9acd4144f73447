"""Shared fixtures. The suite runs against the real PostgreSQL named by DATABASE_URL (``make test``)
and the real Redis named by TEST_REDIS_URL; the model everywhere is the tiny random GLM-4V built
offline by ``build_tiny_model``. Its answers are noise: tests check shapes, counts and consistency,
never what the answer says."""

import os
import socket
import time
from pathlib import Path

import pytest

from tests import media

REPO = Path(__file__).resolve().parent.parent

# Before Django's settings load: this process and every server it starts hash passwords with a fast
# hasher (config/settings.py says why; tests/test_security.py checks the real default separately).
os.environ["INSECURE_FAST_PASSWORD_HASHING_FOR_TESTS"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from inference.engine.tiny_model import build_tiny_model

    return Path(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-glm4v"))


@pytest.fixture(scope="session", autouse=True)
def _fast_password_hashing():
    """pytest-django loaded the settings before this file set the flag above: the same hashers here."""
    from django.conf import settings
    from django.contrib.auth import hashers

    settings.PASSWORD_HASHERS = [
        "django.contrib.auth.hashers.MD5PasswordHasher",
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    ]
    hashers.get_hashers.cache_clear()
    hashers.get_hashers_by_algorithm.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def _use_tiny_model(tiny_model_dir):
    """Every test (and the embedded worker thread) serves the tiny model built for this session."""
    from django.conf import settings

    settings.INFERENCE_MODEL = str(tiny_model_dir)
    os.environ["INFERENCE_MODEL"] = str(tiny_model_dir)  # for subprocesses (servers, workers)


@pytest.fixture(scope="session", autouse=True)
def _forced_outputs():
    """The test-only forced outputs (tests/forcing.py), for this process and the stacks it starts."""
    import json

    from inference.engine import FORCE_TEST_OUTPUT_ENV, SLOW_TEST_MARKER_ENV
    from tests.forcing import FORCED, SLOW

    os.environ[FORCE_TEST_OUTPUT_ENV] = json.dumps(FORCED)
    os.environ[SLOW_TEST_MARKER_ENV] = SLOW


@pytest.fixture(scope="session", autouse=True)
def _no_pruner():
    """No pruner thread in this process's embedded worker or in the processes the tests start: it
    would prune other tests' rows under them. Tests call the pruner themselves, or start a stack
    with PRUNE_INTERVAL_SECONDS set (tests/test_storage.py)."""
    from django.conf import settings
    from django.test import override_settings

    os.environ["PRUNE_INTERVAL_SECONDS"] = "0"
    with override_settings(PRUNE_INTERVAL_SECONDS=0):
        assert settings.PRUNE_INTERVAL_SECONDS == 0
        yield


@pytest.fixture(autouse=True)
def _embedded_work_done_before_the_flush(request, _django_db_marker):
    """After a test with committed rows, wait (bounded) until this process's embedded worker has
    ended the queries it took: an async job a test sent and did not wait for would otherwise be
    written while pytest-django empties the database (a settlement deadlocked the TRUNCATE once).
    Set up after pytest-django's database fixture, so it is torn down before the flush."""
    yield
    marker = request.node.get_closest_marker("django_db")
    if not marker or not (marker.kwargs.get("transaction") or (marker.args and marker.args[0])):
        return
    from inference import dispatch

    embedded = dispatch._dispatchers.get("embedded")
    if embedded is None:
        return
    deadline = time.monotonic() + 120
    idle_checks = 0
    while idle_checks < 2 and time.monotonic() < deadline:  # twice: a query between queue and thread
        idle = embedded._queue.empty() and embedded._holding == 0
        idle_checks = idle_checks + 1 if idle else 0
        time.sleep(0.02)


@pytest.fixture(scope="session", autouse=True)
def _image_storage(tmp_path_factory):
    """The session's images in a folder of its own, for this process and the processes it starts
    (not var/images: the test databases of different sessions reuse tenant ids, so image keys)."""
    from django.conf import settings
    from django.test import override_settings

    folder = tmp_path_factory.mktemp("images")
    os.environ["IMAGE_STORAGE_DIR"] = str(folder)
    images = {"BACKEND": "inference.imagestore.ImageFileStorage", "OPTIONS": {"location": str(folder)}}
    with override_settings(STORAGES={**settings.STORAGES, "images": images}):
        yield folder


@pytest.fixture
def tenant(db):
    from accounts import services

    return services.create_tenant("Acme", slug="acme")


@pytest.fixture
def api_key(tenant):
    """(ApiKey row, plaintext key)."""
    from accounts import services

    return services.create_api_key(tenant, "test key")


@pytest.fixture
def api_client():
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture
def authed_client(api_client, api_key):
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[1]}")
    return api_client


@pytest.fixture
def png_bytes() -> bytes:
    return media.png(64, 48)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def live_stack(django_db_setup, tmp_path_factory, tiny_model_dir):
    """The web process (Uvicorn, `manage.py serve`) + one Celery worker as real processes, on the test
    database and Redis (see tests/stack.py)."""
    from tests.stack import running_stack

    with running_stack(tmp_path_factory.mktemp("stack")) as stack:
        yield stack
