"""The process's one Redis client (django-redis's pool, shared with the cache and RQ)."""

from __future__ import annotations

import functools

from django_redis import get_redis_connection
from redis import Redis

KEY_PREFIX = "llmo"


@functools.cache
def redis_client() -> Redis:
    return get_redis_connection("default")


def key(*parts: object) -> str:
    """Our own Redis keys all start with ``llmo:`` so an operator can find (and never confuse) them."""
    return ":".join((KEY_PREFIX, *map(str, parts)))
