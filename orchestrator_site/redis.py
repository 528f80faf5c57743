"""The process's one Redis client (django-redis's pool, shared with the cache and RQ)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from django.conf import settings
from django_redis import get_redis_connection
from redis import Redis
from redis import asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from orchestrator_site.redis_url import is_sentinel, parse_sentinel, sentinel_kwargs

KEY_PREFIX = "llmo"


@functools.cache
def redis_client() -> Redis:
    return get_redis_connection("default")


def async_client(url: str | None = None) -> aioredis.Redis:
    """A new ``redis.asyncio`` client for ``url`` (default ``REDIS_URL``), Sentinel-aware as the sync one."""
    url = url or settings.REDIS_URL
    if not is_sentinel(url):
        return aioredis.from_url(url)
    target = parse_sentinel(url)
    options = settings.CACHES["default"]["OPTIONS"]
    connect_s, socket_s = options["SOCKET_CONNECT_TIMEOUT"], options["SOCKET_TIMEOUT"]
    sentinel = AsyncSentinel(
        list(target.sentinels),
        sentinel_kwargs=sentinel_kwargs(target, connect_s, socket_s),
        socket_connect_timeout=connect_s,
        username=target.username,
        password=target.password,
    )
    return sentinel.master_for(target.service, db=target.db)


def key(*parts: object) -> str:
    """Our own Redis keys all start with ``llmo:`` so an operator can find (and never confuse) them."""
    return ":".join((KEY_PREFIX, *map(str, parts)))


class Reply:
    """One command's answer in a :class:`RoundTrip`, set by its ``execute()``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Any = None


class RoundTrip:
    """Commands and Lua scripts from several modules sent in one round trip (a plain pipeline).

    A script goes as EVALSHA; one that Redis does not know (restarted or flushed since this process
    loaded it) fails alone with NOSCRIPT and is then run by itself, which loads it. ``execute``
    raises the first other error (``RedisError``), after every command was sent.
    """

    def __init__(self, client: Redis | None = None) -> None:
        self.pipe = (client or redis_client()).pipeline(transaction=False)
        self._calls: list[tuple[Reply, Callable[[Any], Any] | None, tuple | None]] = []

    def script(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], then: Callable[[Any], Any] | None = None
    ) -> Reply:
        self.pipe.evalsha(script.sha, len(keys), *keys, *args)
        return self._add(then, (script, list(keys), list(args)))

    def command(self, name: str, *args: Any, then: Callable[[Any], Any] | None = None) -> Reply:
        getattr(self.pipe, name)(*args)
        return self._add(then, None)

    def _add(self, then: Callable[[Any], Any] | None, script: tuple | None) -> Reply:
        reply = Reply()
        self._calls.append((reply, then, script))
        return reply

    def execute(self) -> None:
        if not self._calls:
            return
        raw = self.pipe.execute(raise_on_error=False)
        error = None
        for (reply, then, script), value in zip(self._calls, raw, strict=True):
            if isinstance(value, NoScriptError) and script is not None:
                value = script[0](keys=script[1], args=script[2])
            if isinstance(value, Exception):
                error = error or value
                continue
            reply.value = then(value) if then is not None else value
        if error is not None:
            raise error


def reply_text(raw: Any) -> str:
    """A Redis reply as text (redis-py returns bytes unless the client decodes; None is empty)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw or "")
