"""How many websockets each API key holds open, capped at MAX_SOCKETS_PER_KEY.

In production the count lives in Redis so that it holds across web processes: a sorted set per
key, one member per open socket, scored by when its lease ends. An open socket renews its lease
every third of WS_SOCKET_LEASE_SECONDS; a web process that dies without closing its sockets
stops renewing them, so their places free themselves within one lease. The embedded default
(one process) counts in memory.
"""

import threading
import time

import redis
from django.conf import settings

from config.errors import ApiError

# Drop expired leases, count the rest, and take a place if one is free, in one step so that two
# sockets opening at once on different processes cannot both take the last place.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

_local_lock = threading.Lock()
_local: dict[int, set[str]] = {}


def _redis():
    """The Redis client both apps share."""
    from config.redis import client

    return client()


def _key(api_key_id) -> str:
    return f"{settings.REDIS_KEY_PREFIX}:ws:{api_key_id}"


def _lease_ms() -> int:
    return int(settings.WS_SOCKET_LEASE_SECONDS * 1000)


def renew_every() -> float:
    return settings.WS_SOCKET_LEASE_SECONDS / 3


def acquire(api_key_id, socket_id: str) -> None:
    """Take a place for this socket. Raises ``ApiError`` ``rate_limited`` when the key holds the
    most sockets it may, ``service_unavailable`` when Redis cannot be reached."""
    cap = settings.MAX_SOCKETS_PER_KEY
    if settings.EMBEDDED:
        with _local_lock:
            held = _local.setdefault(api_key_id, set())
            taken = len(held) < cap
            if taken:
                held.add(socket_id)
    else:
        now = int(time.time() * 1000)
        try:
            taken = bool(
                _redis().eval(_ACQUIRE, 1, _key(api_key_id), now, now + _lease_ms(), cap, socket_id, _lease_ms() * 2)
            )
        except redis.RedisError as exc:
            raise ApiError("service_unavailable", "The service is briefly unavailable; connect again shortly.") from exc
    if not taken:
        raise ApiError(
            "rate_limited",
            f"This key has {cap} websockets open, the most it may; close one or use another key.",
        )


def renew(api_key_id, socket_id: str) -> None:
    """Extend this socket's lease (Redis only; in-process places last until released)."""
    if settings.EMBEDDED:
        return
    now = int(time.time() * 1000)
    pipe = _redis().pipeline()
    pipe.zadd(_key(api_key_id), {socket_id: now + _lease_ms()}, xx=True)
    pipe.pexpire(_key(api_key_id), _lease_ms() * 2)
    pipe.execute()


def release(api_key_id, socket_id: str) -> None:
    if settings.EMBEDDED:
        with _local_lock:
            held = _local.get(api_key_id)
            if held is not None:
                held.discard(socket_id)
                if not held:
                    del _local[api_key_id]
        return
    _redis().zrem(_key(api_key_id), socket_id)
