"""Live backend figures in Redis: written by workers after every call, read by routing.

Per backend (``<name>`` is the backend's name):

- ``llmo:stats:<name>``         hash: ``ewma_ms``, ``p95_ms``, ``error_rate``, ``calls``,
  ``last_error``, ``last_error_at``, ``updated_at``;
- ``llmo:stats:<name>:window``  list of the last ``WINDOW`` calls as ``"<ok 1|0>:<latency ms>"``;
- ``llmo:inflight:<name>``      sorted set of in-flight call leases scored by their expiry, written by
  ``routing.capacity`` (the fleet-wide ``max_concurrency`` semaphore); counted here;
- ``llmo:circuit:<name>``       hash with ``state`` = closed|open|half_open and ``open_until``, written
  by the circuit breaker (``routing.circuit``); read here only. An ``open`` state whose ``open_until``
  has passed is reported as ``half_open``: the breaker moves there lazily, on the next call it allows.

Writes are one Lua call (one round trip, atomic: two workers finishing at once cannot lose an
update), and so is the read of any number of backends: routing runs on every submission. The
figures are derived on write (a worker writes once per job, routing reads on every job).
Latency figures (EWMA, p95) count successful calls only: a backend that fails fast must not
look fast. The error rate counts every call in the window. Times come from Redis's clock so
hosts with skewed clocks agree about lease expiry.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

from redis.client import Pipeline
from redis.commands.core import Script

from orchestrator_site.redis import Reply, RoundTrip, key, redis_client
from routing.strategies import BackendStats

log = logging.getLogger(__name__)

WINDOW = 200  # calls behind p95 and error_rate
EWMA_ALPHA = 0.2  # weight of the newest call: ~the last 10 calls dominate
TTL_S = 7 * 24 * 3600  # figures of a backend nobody calls any more fade away
ERROR_TEXT_MAX = 500

_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ok, lat = ARGV[1], tonumber(ARGV[2])
redis.call('LPUSH', KEYS[2], ok .. ':' .. ARGV[2])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[4]) - 1)
local lats, errors, n = {}, 0, 0
for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  n = n + 1
  if string.sub(e, 1, 1) == '1' then
    lats[#lats + 1] = tonumber(string.sub(e, 3))
  else
    errors = errors + 1
  end
end
local fields = {'error_rate', string.format('%.6f', errors / n), 'calls', n,
                'updated_at', string.format('%.6f', now)}
if #lats > 0 then
  table.sort(lats)
  fields[#fields + 1] = 'p95_ms'
  fields[#fields + 1] = string.format('%.3f', lats[math.max(1, math.ceil(0.95 * #lats))])
end
if ok == '1' then
  local ewma = tonumber(redis.call('HGET', KEYS[1], 'ewma_ms'))
  if ewma == nil then ewma = lat else ewma = ewma + tonumber(ARGV[5]) * (lat - ewma) end
  fields[#fields + 1] = 'ewma_ms'
  fields[#fields + 1] = string.format('%.3f', ewma)
else
  fields[#fields + 1] = 'last_error'
  fields[#fields + 1] = ARGV[3]
  fields[#fields + 1] = 'last_error_at'
  fields[#fields + 1] = string.format('%.6f', now)
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
"""

# Read-only: expired leases are not counted (ZCOUNT from now); ENTER prunes them. The reply is
# flat and compact (one string of figures per backend): on the submission hot path the client's
# reply parsing costs more than the script. ARGV[1] = "1" adds the last error (admin pages).
_READ = """
local t = redis.call('TIME')
local now = '(' .. t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local now_s = tonumber(t[1]) + tonumber(t[2]) / 1000000
local fields = {'ewma_ms', 'p95_ms', 'error_rate', 'calls'}
if ARGV[1] == '1' then
  fields[5] = 'last_error_at'
  fields[6] = 'last_error'
end
local out = {}
for i = 1, #KEYS, 3 do
  local f = redis.call('HMGET', KEYS[i], unpack(fields))
  for j = 1, #fields do f[j] = f[j] or '' end
  out[#out + 1] = table.concat(f, '\\t')
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i + 1], now, '+inf')
  -- An open circuit past its cool-down reads half_open: routing lets jobs through so that one can
  -- be the trial (routing.circuit.allow grants exactly one; the rest fall back in the worker).
  local c = redis.call('HMGET', KEYS[i + 2], 'state', 'open_until')
  local state = c[1] or ''
  if state == 'open' and c[2] and tonumber(c[2]) <= now_s then state = 'half_open' end
  out[#out + 1] = state
end
return out
"""


def stats_key(name: str) -> str:
    return key("stats", name)


def window_key(name: str) -> str:
    return key("stats", name, "window")


def inflight_key(name: str) -> str:
    return key("inflight", name)


def circuit_key(name: str) -> str:
    return key("circuit", name)


@functools.cache
def _scripts() -> dict[str, Script]:
    client = redis_client()
    sources = {"record": _RECORD, "read": _READ}
    return {name: client.register_script(src) for name, src in sources.items()}


def record_call(backend_name: str, *, latency_ms: float, ok: bool, error: str = "") -> None:
    """Fold one finished backend call into the live figures (one round trip)."""
    rt = RoundTrip()
    record_call_in(rt, backend_name, latency_ms=latency_ms, ok=ok, error=error)
    rt.execute()


def record_call_in(rt: RoundTrip, backend_name: str, *, latency_ms: float, ok: bool, error: str = "") -> Reply:
    """``record_call`` as part of ``rt`` (sent with the caller's other commands)."""
    return rt.script(
        _scripts()["record"],
        keys=[stats_key(backend_name), window_key(backend_name)],
        args=["1" if ok else "0", f"{max(latency_ms, 0.0):.3f}", error[:ERROR_TEXT_MAX], WINDOW, EWMA_ALPHA, TTL_S],
    )


def _num(raw: bytes) -> float | None:
    return float(raw) if raw else None


def _parse(names: list[str], raw: list[Any]) -> dict[str, BackendStats]:
    out: dict[str, BackendStats] = {}
    for i, name in enumerate(names):
        figures, in_flight_n, circuit = raw[3 * i : 3 * i + 3]
        ewma, p95, err, calls, *error = figures.split(b"\t", 5)
        state = circuit.decode() if circuit else "closed"
        out[name] = BackendStats(
            in_flight=in_flight_n,
            ewma_latency_ms=_num(ewma),
            p95_latency_ms=_num(p95),
            error_rate=float(err) if err else 0.0,
            circuit_open=state == "open",
            calls=int(calls) if calls else 0,
            last_error_at=_num(error[0]) if error else None,
            last_error=error[1].decode() if error else "",
            circuit_state=state,
        )
    return out


@functools.lru_cache(maxsize=64)
def _keys(names: tuple[str, ...]) -> list[str]:
    return [k for n in names for k in (stats_key(n), inflight_key(n), circuit_key(n))]


def read_stats(names: Iterable[str], *, details: bool = False) -> dict[str, BackendStats]:
    """Live figures for ``names`` in one round trip; a backend with no figures gets zeros.

    ``details`` adds the last error's text and time (for operators; routing does not need them).
    """
    names = tuple(names)
    if not names:
        return {}
    return _parse(list(names), _scripts()["read"](keys=_keys(names), args=["1" if details else "0"]))


def queue_read(pipe: Pipeline, names: Iterable[str]) -> Callable[[Any], dict[str, BackendStats]]:
    """Add the stats read to ``pipe``; returns the parser for its slot in ``pipe.execute()``.

    Lets a caller that already makes a round trip (job submission reads the registry
    version) fetch the stats in the same one.
    """
    names = tuple(names)
    keys = _keys(names)
    # EVAL, not EVALSHA: a pipeline holding a Script object first asks SCRIPT EXISTS, which
    # is the very round trip we are saving; Redis caches the compiled body by its SHA anyway.
    pipe.eval(_READ, len(keys), *keys, "0")
    return lambda raw: _parse(list(names), raw)


def reset(backend_name: str) -> None:
    """Forget a backend's figures (not its circuit state: the breaker owns that)."""
    redis_client().delete(stats_key(backend_name), window_key(backend_name), inflight_key(backend_name))
