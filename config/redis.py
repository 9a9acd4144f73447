"""The Redis client and key names that both apps share (quotas in accounts; heartbeats, cancel
flags and the sweeper in inference), so neither app imports the other for them."""

from functools import lru_cache

import redis
from django.conf import settings


@lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=30)


def client() -> redis.Redis:
    """The process's client of ``REDIS_URL`` (one connection pool per URL)."""
    return _client(settings.REDIS_URL)


def key(*parts) -> str:
    """A Redis key under this deployment's ``REDIS_KEY_PREFIX``."""
    return ":".join([settings.REDIS_KEY_PREFIX, *(str(part) for part in parts)])
