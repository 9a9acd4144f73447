"""Sign-in throttling, for the dashboard's and the admin's login alike.

After ``SIGNIN_MAX_FAILURES`` failed sign-ins for one username, or from one client address, within
``SIGNIN_WINDOW_SECONDS``, further tries are refused without checking the password, until the
oldest of those failures leaves the window. Refused tries are not counted (else an attacker could
keep a user locked out for ever), and a successful sign-in resets nothing: the per-address count is
shared by everyone behind that address, and the per-user count is what guards the user's password.

Failures are timestamps in a sorted set per subject in Redis in production (every web process
sees them), and in this process's memory in the embedded default (one process).
"""

import hashlib
import math
import threading
import time
import unicodedata
import uuid
from collections import deque

from django.conf import settings


class CounterUnavailable(Exception):
    """The failure counter (Redis) cannot be reached: sign-in is refused rather than unthrottled."""


def _subjects(*, username: str, address: str) -> list[str]:
    # The form normalises usernames with NFKC before looking them up (Django's UsernameField), so
    # count them the same way: "ａlice" must not be a fresh counter for "alice". Hashed: any text.
    name = unicodedata.normalize("NFKC", username)
    subjects = [f"user:{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()}"]
    if address:
        subjects.append(f"addr:{address}")
    return subjects


def refused_for(*, username: str, address: str) -> int:
    """Seconds until a sign-in as ``username`` from ``address`` may be tried again; 0: now."""
    now = time.time()
    limit = settings.SIGNIN_MAX_FAILURES
    wait = 0.0
    for times in _failures(_subjects(username=username, address=address), now=now, record=False):
        if len(times) >= limit:
            wait = max(wait, times[-limit] + settings.SIGNIN_WINDOW_SECONDS - now)
    return math.ceil(wait)


def record_failure(*, username: str, address: str) -> None:
    _failures(_subjects(username=username, address=address), now=time.time(), record=True)


def _failures(subjects: list[str], *, now: float, record: bool) -> list[list[float]]:
    """The failure times (ascending) within the window of each subject, after adding ``now`` when
    ``record``."""
    if settings.EMBEDDED:
        return _local_failures(subjects, now=now, record=record)
    import redis

    try:
        return _redis_failures(subjects, now=now, record=record)
    except redis.RedisError as error:
        raise CounterUnavailable(str(error)) from error


def _redis_failures(subjects: list[str], *, now: float, record: bool) -> list[list[float]]:
    from config.redis import client  # the Redis client both apps share

    window = settings.SIGNIN_WINDOW_SECONDS
    pipe = client().pipeline(transaction=True)
    for subject in subjects:
        key = f"{settings.REDIS_KEY_PREFIX}:signin:{subject}"
        if record:
            pipe.zadd(key, {f"{now}:{uuid.uuid4().hex[:8]}": now})
            pipe.expire(key, window + 1)
        pipe.zremrangebyscore(key, "-inf", now - window)
        pipe.zrange(key, 0, -1, withscores=True)
    results = pipe.execute()
    per_subject = len(results) // len(subjects)
    return [[score for _, score in results[i * per_subject + per_subject - 1]] for i in range(len(subjects))]


_local: dict[str, deque] = {}
_local_lock = threading.Lock()


def _local_failures(subjects: list[str], *, now: float, record: bool) -> list[list[float]]:
    horizon = now - settings.SIGNIN_WINDOW_SECONDS
    with _local_lock:
        if len(_local) > 10_000:  # many usernames tried once: drop the expired ones, memory stays bounded
            for subject in [s for s, times in _local.items() if not times or times[-1] <= horizon]:
                del _local[subject]
        out = []
        for subject in subjects:
            times = _local.setdefault(subject, deque())
            while times and times[0] <= horizon:
                times.popleft()
            if record:
                times.append(now)
            out.append(list(times))
            if not times:
                del _local[subject]
        return out
