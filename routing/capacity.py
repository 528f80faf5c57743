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

from orchestrator_site.redis import Reply, RoundTrip, redis_client
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

# KEYS: one inflight set per lease; ARGV[1] = ttl, ARGV[2] = 'XX' (renew only leases still there) or
# 'NX' (write back lost ones), ARGV[3..] = the lease ids, in KEYS order. Returns the indexes (1-based)
# of the leases an XX pass did not find.
_RENEW = """
local t = redis.call('TIME')
local expiry = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1]))
local missing = {}
for i, k in ipairs(KEYS) do
  if redis.call('ZADD', k, ARGV[2], 'CH', expiry, ARGV[i + 2]) == 0 and ARGV[2] == 'XX'
     and not redis.call('ZSCORE', k, ARGV[i + 2]) then
    missing[#missing + 1] = i
  end
  redis.call('EXPIRE', k, math.ceil(tonumber(ARGV[1])) + 60)
end
return missing
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
    rt = RoundTrip()
    lease, taken = acquire_in(rt, backend_name, limit, owner=owner)
    try:
        rt.execute()
    except RedisError as exc:
        return hold_anyway(lease, backend_name, owner, exc)
    return lease if taken.value else None


def acquire_in(rt: RoundTrip, backend_name: str, limit: int, *, owner: str = "") -> tuple[str, Reply]:
    """``try_acquire`` as part of ``rt``: the lease id it asks for, and a reply that is True when taken
    (the lease is then held here). If ``rt`` fails, see :func:`hold_anyway`."""
    lease = uuid.uuid4().hex
    # No process lock around Redis calls: a thread holding one across a round trip makes every
    # other job thread queue behind it (and behind the GIL hand-offs of that round trip).

    def after(ok: int) -> bool:
        if ok:
            with _lock:
                _held[lease] = (backend_name, owner)
        return bool(ok)

    reply = rt.script(
        _scripts()["acquire"], keys=[inflight_key(backend_name)], args=[lease, lease_ttl_s(), max(limit, 1)], then=after
    )
    return lease, reply


def hold_anyway(lease: str, backend_name: str, owner: str, exc: Exception) -> str:
    """Redis did not answer the acquire: hold the lease anyway (losing Redis must not stop work);
    the next renewal writes it to Redis once Redis answers again."""
    log.warning("backend slot not taken (Redis); calling anyway", extra={"backend": backend_name, "error": str(exc)})
    with _lock:
        _held[lease] = (backend_name, owner)
    return lease


def release(lease: str) -> None:
    """Give a slot back; Redis trouble is logged (the lease then expires by itself). A lease already
    given back (by ``release_in``) costs nothing."""
    backend_name = _forget(lease)
    if backend_name is None:
        return
    try:
        redis_client().zrem(inflight_key(backend_name), lease)
    except RedisError as exc:
        log.warning("backend slot not released", extra={"backend": backend_name, "error": str(exc)})


def release_in(rt: RoundTrip, lease: str) -> None:
    """``release`` as part of ``rt``: forgotten here at once, removed in Redis when ``rt`` is sent
    (if that fails, the lease expires by itself)."""
    backend_name = _forget(lease)
    if backend_name is not None:
        rt.command("zrem", inflight_key(backend_name), lease)


def _forget(lease: str) -> str | None:
    """Stop holding ``lease`` in this process; its backend's name, or None if it was not held."""
    with _lock:
        held = _held.pop(lease, None)
    return held[0] if held is not None else None


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
    """Push the expiry of every lease this process holds; called by the heartbeat.

    Renewal touches only leases still in Redis (``ZADD XX``), so one released meanwhile is never
    written back. Leases Redis lost (a restart or flush) and this process still holds are written
    back in a second call; only a lease released in the instant between the two could come back,
    and it would expire within one lease TTL.
    """
    with _lock:
        leases = list(_held.items())
    if not leases:
        return 0
    keys = [inflight_key(name) for _, (name, _) in leases]
    missing = _scripts()["renew"](keys=keys, args=[lease_ttl_s(), "XX", *(lease for lease, _ in leases)])
    if missing:
        with _lock:
            lost = [leases[int(i) - 1] for i in missing if leases[int(i) - 1][0] in _held]
        if lost:
            _scripts()["renew"](
                keys=[inflight_key(name) for _, (name, _) in lost],
                args=[lease_ttl_s(), "NX", *(lease for lease, _ in lost)],
            )
    return len(leases)


def held_count() -> int:
    with _lock:
        return len(_held)
