"""A backend's ``max_concurrency``, held across every worker on every host: a Redis semaphore of leases.

``llmo:inflight:<name>`` is a sorted set of lease ids scored by their expiry (Redis's clock, so
hosts with skewed clocks agree). Taking a slot is one Lua call: drop expired leases, refuse when
``max_concurrency`` are left, else add ours. Leases are short (``WORKER_LEASE_TTL_S``, 15 s) and
the holding process renews them from its heartbeat thread (:func:`renew_held`), so:

- a worker killed by SIGKILL stops holding its slots within one lease TTL, however long its call
  was allowed to run (no counter to leak, and no slot held for a dead job's whole timeout);
- after a Redis restart or FLUSHALL the next renewal writes the held leases back, so the count is
  right again within one heartbeat (in between, new calls may briefly exceed the limit).

If Redis cannot answer, a call goes ahead without a slot (logged): losing Redis must not stop work.
The same set is what routing counts as a backend's calls in flight (``routing.stats``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import uuid
from collections.abc import Iterator

from django.conf import settings
from redis.commands.core import Script
from redis.exceptions import RedisError

from orchestrator_site.redis import redis_client
from routing.stats import inflight_key

log = logging.getLogger(__name__)

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], string.format('%.6f', now + tonumber(ARGV[2])), ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])) + 60)
return 1
"""

# KEYS: one inflight set per lease; ARGV[1] = ttl, ARGV[2..] = the lease ids, in KEYS order.
_RENEW = """
local t = redis.call('TIME')
local expiry = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1]))
for i, k in ipairs(KEYS) do
  redis.call('ZADD', k, expiry, ARGV[i + 1])
  redis.call('EXPIRE', k, math.ceil(tonumber(ARGV[1])) + 60)
end
return #KEYS
"""

_lock = threading.Lock()
_held: dict[str, tuple[str, str]] = {}  # lease id -> (backend name, owner), in this process


@functools.cache
def _scripts() -> dict[str, Script]:
    client = redis_client()
    return {"acquire": client.register_script(_ACQUIRE), "renew": client.register_script(_RENEW)}


def lease_ttl_s() -> float:
    return float(settings.WORKER_LEASE_TTL_S)


def try_acquire(backend_name: str, limit: int, *, owner: str = "") -> str | None:
    """A lease id when one of ``limit`` slots was free, else None. ``owner`` (a job id) groups leases."""
    lease = uuid.uuid4().hex
    # Under the process lock, so a renewal never writes back a lease whose acquire is undecided.
    with _lock:
        try:
            if not _scripts()["acquire"](keys=[inflight_key(backend_name)], args=[lease, lease_ttl_s(), max(limit, 1)]):
                return None
        except RedisError as exc:
            # Held anyway: the next renewal writes it to Redis once Redis answers again.
            log.warning(
                "backend slot not taken (Redis); calling anyway", extra={"backend": backend_name, "error": f"{exc}"}
            )
        _held[lease] = (backend_name, owner)
    return lease


def release(lease: str) -> None:
    """Give a slot back; Redis trouble is logged (the lease then expires by itself)."""
    with _lock:
        held = _held.pop(lease, None)
        if held is None:
            return
        try:
            redis_client().zrem(inflight_key(held[0]), lease)
        except RedisError as exc:
            log.warning("backend slot not released", extra={"backend": held[0], "error": str(exc)})


@contextlib.contextmanager
def slot(backend_name: str, limit: int, *, owner: str = "") -> Iterator[str | None]:
    """Hold one of ``limit`` slots for the block: yields the lease, or None when all were taken."""
    lease = try_acquire(backend_name, limit, owner=owner)
    try:
        yield lease
    finally:
        if lease is not None:
            release(lease)


def release_owner(owner: str) -> int:
    """Give back every slot ``owner`` holds (a job abandoned past its deadline); returns how many."""
    with _lock:
        leases = [lease for lease, (_, o) in _held.items() if o == owner]
    for lease in leases:
        release(lease)
    return len(leases)


def renew_held() -> int:
    """Push the expiry of every lease this process holds (one round trip); called by the heartbeat.

    Under the lock, so a lease released concurrently is not written back after its release.
    """
    with _lock:
        if not _held:
            return 0
        leases = list(_held.items())
        keys = [inflight_key(name) for _, (name, _) in leases]
        _scripts()["renew"](keys=keys, args=[lease_ttl_s(), *(lease for lease, _ in leases)])
    return len(leases)


def held_count() -> int:
    with _lock:
        return len(_held)
