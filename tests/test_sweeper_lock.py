"""The Redis locks of the workers' shared duties, the sweeper's and the pruner's: one holder at a
time, held as long as its pass runs, and free soon after its holder died (a worker SIGKILLed
mid-sweep held the sweeper's for 60 s, and the queries it had been running ended worker_lost that
much later). Against the real Redis of TEST_REDIS_URL."""

import os
import threading
import time
import uuid

import pytest

from inference import privacy, workers


@pytest.fixture
def redis_settings(settings, monkeypatch):
    settings.EMBEDDED = False
    settings.REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    settings.REDIS_KEY_PREFIX = f"sightline-test-sweeper-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(workers, "DUTY_LOCK_SECONDS", 1.0)
    yield
    keys = list(workers.client().scan_iter(match=f"{settings.REDIS_KEY_PREFIX}:*"))
    if keys:
        workers.client().delete(*keys)


DUTIES = {
    # duty: (what a worker calls, the module and name of the pass it runs under the lock)
    "sweeper": (lambda: workers.sweep_with_lock(), workers, "sweep"),
    "pruner": (lambda: workers.prune_with_lock(), privacy, "prune"),
}


@pytest.mark.parametrize("duty", DUTIES)
def test_a_dead_holders_lock_lapses_after_the_lock_seconds(duty, redis_settings, monkeypatch):
    run, module, name = DUTIES[duty]
    monkeypatch.setattr(module, name, lambda **options: {"done": True})
    # What a SIGKILLed worker leaves: the lock taken, never renewed nor released.
    dead = workers.client().lock(workers._key(duty), timeout=workers.DUTY_LOCK_SECONDS)
    assert dead.acquire(blocking=False)
    assert run() is None  # held: this worker skips its turn
    deadline = time.monotonic() + 10
    while (result := run()) is None:
        assert time.monotonic() < deadline, "the dead holder's lock never lapsed"
        time.sleep(0.1)
    assert result == {"done": True}


@pytest.mark.parametrize("duty", DUTIES)
def test_a_long_pass_keeps_its_lock_until_it_ends(duty, redis_settings, monkeypatch):
    run, module, name = DUTIES[duty]
    started, release = threading.Event(), threading.Event()

    def slow_pass(**options):
        started.set()
        release.wait(10)
        return {"done": True}

    monkeypatch.setattr(module, name, slow_pass)
    results = []
    first = threading.Thread(target=lambda: results.append(run()))
    first.start()
    assert started.wait(10)
    # Were its holder to die now, its lock would lapse within one lifetime (none renews it).
    assert 0 < workers.client().pttl(workers._key(duty)) <= workers.DUTY_LOCK_SECONDS * 1000
    # Three lock lifetimes while the first pass runs: every other worker skips its turn.
    deadline = time.monotonic() + 3 * workers.DUTY_LOCK_SECONDS
    while time.monotonic() < deadline:
        assert run() is None
        time.sleep(0.1)
    release.set()
    first.join(10)
    assert results == [{"done": True}]
    assert run() == {"done": True}  # released at its end
