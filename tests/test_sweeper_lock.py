"""The sweeper's Redis lock: one sweeper at a time, held as long as its sweep runs, and free soon
after its holder died (a worker SIGKILLed mid-sweep held it for 60 s, and the queries it had been
running ended worker_lost that much later). Against the real Redis of TEST_REDIS_URL."""

import os
import threading
import time
import uuid

import pytest

from inference import workers


@pytest.fixture
def redis_settings(settings, monkeypatch):
    settings.EMBEDDED = False
    settings.REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    settings.REDIS_KEY_PREFIX = f"sightline-test-sweeper-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(workers, "SWEEPER_LOCK_SECONDS", 1.0)
    yield
    keys = list(workers.client().scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:*"))
    if keys:
        workers.client().delete(*keys)


def test_a_dead_holders_lock_lapses_after_the_lock_seconds(redis_settings, monkeypatch):
    monkeypatch.setattr(workers, "sweep", lambda **options: {"swept": True})
    # What a SIGKILLed worker leaves: the lock taken, never renewed nor released.
    dead = workers.client().lock(workers._key("sweeper"), timeout=workers.SWEEPER_LOCK_SECONDS)
    assert dead.acquire(blocking=False)
    assert workers.sweep_with_lock() is None  # held: this sweeper skips its turn
    deadline = time.monotonic() + 10
    while (result := workers.sweep_with_lock()) is None:
        assert time.monotonic() < deadline, "the dead holder's lock never lapsed"
        time.sleep(0.1)
    assert result == {"swept": True}


def test_a_long_sweep_keeps_its_lock_until_it_ends(redis_settings, monkeypatch):
    started, release = threading.Event(), threading.Event()

    def slow_sweep(**options):
        started.set()
        release.wait(10)
        return {"swept": True}

    monkeypatch.setattr(workers, "sweep", slow_sweep)
    results = []
    first = threading.Thread(target=lambda: results.append(workers.sweep_with_lock()))
    first.start()
    assert started.wait(10)
    # Three lock lifetimes while the first sweep runs: every other sweeper skips its turn.
    deadline = time.monotonic() + 3 * workers.SWEEPER_LOCK_SECONDS
    while time.monotonic() < deadline:
        assert workers.sweep_with_lock() is None
        time.sleep(0.1)
    release.set()
    first.join(10)
    assert results == [{"swept": True}]
    assert workers.sweep_with_lock() == {"swept": True}  # released at its end
