"""A per-backend circuit breaker shared by every worker through Redis.

Why: a backend that is down should cost each job nothing, not a full retry budget. Every worker
records each call's outcome here and asks ``allow`` before each call; routing skips a backend whose
circuit is open (``routing.stats`` reads the ``state`` field below).

Per backend (``<name>`` is the backend's name):

- ``llmo:circuit:<name>``          hash: ``state`` closed|open|half_open, ``failures`` (consecutive),
  ``opened_at``, ``open_until`` (end of the cool-down), ``reason``, ``trial_until`` (lease of the
  half-open trial call), ``changed_at``;
- ``llmo:circuit:<name>:calls``    list of the last ``window`` outcomes (``1`` ok / ``0`` failed);
- ``llmo:circuit:<name>:history``  capped list of transitions, newest first, as JSON
  ``{"at", "from", "to", "reason"}``.

Transitions: closed → open after ``circuit_failures`` consecutive failures (default 5) or when at
least ``circuit_min_calls`` (10) of the last ``circuit_window`` (20) calls hold an error rate of
``circuit_error_rate`` (0.5) or more. open → half_open lazily, by the first ``allow`` after the
cool-down (``circuit_cooldown_s``, default 30): that caller gets the one trial call, everyone else
keeps skipping until the trial reports (or its lease runs out, so a trial whose worker was killed
cannot wedge the circuit). half_open → closed on a success, → open again on a failure.

Every step is one Lua script (atomic across workers, one round trip) and uses Redis's clock, so
hosts with skewed clocks agree about the cool-down. Outcomes of calls that started before the
circuit opened and finish while it is open change nothing: only the trial decides.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.commands.core import Script

from orchestrator_site.redis import Reply, RoundTrip, key, redis_client
from routing.models import config_number
from routing.stats import circuit_key

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
HISTORY_MAX = 50
REASON_MAX = 300
TTL_S = 30 * 24 * 3600  # a backend nobody calls any more forgets its circuit eventually


@dataclass(frozen=True)
class CircuitConfig:
    """The breaker's thresholds for one backend, from its ``config`` (bad values fall back to defaults)."""

    failures: int = 5
    cooldown_s: float = 30.0
    window: int = 20
    min_calls: int = 10
    error_rate: float = 0.5

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> CircuitConfig:
        config = config or {}
        d = cls()
        return cls(
            failures=int(config_number(config, "circuit_failures", d.failures, minimum=1)),
            cooldown_s=config_number(config, "circuit_cooldown_s", d.cooldown_s, minimum=0.0),
            window=int(config_number(config, "circuit_window", d.window, minimum=1)),
            min_calls=int(config_number(config, "circuit_min_calls", d.min_calls, minimum=1)),
            error_rate=config_number(config, "circuit_error_rate", d.error_rate, minimum=0.0, maximum=1.0),
        )


@dataclass(frozen=True)
class Transition:
    at: float
    from_state: str
    to_state: str
    reason: str


@dataclass(frozen=True)
class CircuitStatus:
    """What an operator sees: the effective state (an open circuit past its cool-down reads half_open)."""

    state: str = CLOSED
    stored_state: str = CLOSED
    failures: int = 0
    opened_at: float | None = None
    open_until: float | None = None
    reason: str = ""
    history: list[Transition] = field(default_factory=list)


def calls_key(name: str) -> str:
    return key("circuit", name, "calls")


def history_key(name: str) -> str:
    return key("circuit", name, "history")


# Shared Lua: the time, the history append and the state change.
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.6f', x) end
local function move(from, to, reason, extra)
  local fields = {'state', to, 'changed_at', fmt(now), 'reason', reason}
  for i = 1, #extra do fields[#fields + 1] = extra[i] end
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('LPUSH', KEYS[3], cjson.encode({at = now, from = from, to = to, reason = reason}))
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[1]) - 1)
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
"""

# KEYS: hash, calls, history. ARGV: history max, ttl, trial lease seconds.
# Returns {allowed 0|1, effective state, 1 when this caller holds the half-open trial}.
_ALLOW = (
    _COMMON
    + """
if state == 'closed' then return {1, 'closed', 0} end
if state == 'open' then
  local until_ = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
  if now < until_ then return {0, 'open', 0} end
  move('open', 'half_open', 'cool-down over; one trial call allowed',
       {'trial_until', fmt(now + tonumber(ARGV[3]))})
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {1, 'half_open', 1}
end
-- half_open: one trial at a time; a trial whose lease ran out (its worker died) is replaced
local trial = tonumber(redis.call('HGET', KEYS[1], 'trial_until') or '0')
if now < trial then return {0, 'half_open', 0} end
redis.call('HSET', KEYS[1], 'trial_until', fmt(now + tonumber(ARGV[3])))
return {1, 'half_open', 1}
"""
)

# KEYS: hash, calls, history. ARGV: history max, ttl, ok 1|0, failures, window, min calls,
# error rate, cool-down seconds, error text. Returns the state after the call.
_RECORD = (
    _COMMON
    + """
local ok = ARGV[3] == '1'
local cooldown = tonumber(ARGV[8])
local function open(reason)
  move(state, 'open', reason, {'opened_at', fmt(now), 'open_until', fmt(now + cooldown), 'trial_until', '0'})
end
redis.call('LPUSH', KEYS[2], ok and '1' or '0')
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[5]) - 1)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
local err = ARGV[9]
if ok then
  redis.call('HSET', KEYS[1], 'failures', 0)
  if state == 'half_open' then
    move('half_open', 'closed', 'trial call succeeded', {'trial_until', '0'})
    redis.call('DEL', KEYS[2])  -- the failures that opened it must not re-open it at once
    return 'closed'
  end
  if state == 'closed' then redis.call('HSETNX', KEYS[1], 'state', 'closed') end
  return state
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if state == 'half_open' then
  open('trial call failed: ' .. err)
  return 'open'
end
if state == 'open' then return 'open' end  -- a call that began before the circuit opened
if failures >= tonumber(ARGV[4]) then
  open(failures .. ' consecutive failures; last: ' .. err)
  return 'open'
end
local calls = redis.call('LRANGE', KEYS[2], 0, -1)
local bad = 0
for _, c in ipairs(calls) do if c == '0' then bad = bad + 1 end end
if #calls >= tonumber(ARGV[6]) and bad / #calls >= tonumber(ARGV[7]) then
  open(string.format('error rate %d%% over the last %d calls; last: %s', math.floor(100 * bad / #calls), #calls, err))
  return 'open'
end
redis.call('HSETNX', KEYS[1], 'state', 'closed')
return 'closed'
"""
)

# KEYS: hash, calls, history. The trial granted by _ALLOW is offered again at once.
_RETURN_TRIAL = """
if redis.call('HGET', KEYS[1], 'state') == 'half_open' then redis.call('HSET', KEYS[1], 'trial_until', '0') end
return 1
"""

# KEYS: hash, calls, history. ARGV: history max, ttl, reason.
_RESET = (
    _COMMON
    + """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'failures', 0, 'trial_until', '0')
if state ~= 'closed' then move(state, 'closed', ARGV[3], {}) end
return 'closed'
"""
)


@functools.cache
def _scripts() -> dict[str, Script]:
    client = redis_client()
    sources = (("allow", _ALLOW), ("record", _RECORD), ("reset", _RESET), ("return_trial", _RETURN_TRIAL))
    return {name: client.register_script(src) for name, src in sources}


def _keys(name: str) -> list[str]:
    return [circuit_key(name), calls_key(name), history_key(name)]


def allow(name: str, *, trial_lease_s: float = 60.0) -> tuple[bool, str]:
    """May a call go to ``name`` now? Returns (allowed, effective state).

    A closed circuit allows every call; an open one none until its cool-down ends, when exactly one
    caller gets the half-open trial (held for ``trial_lease_s``, then offered again).
    """
    rt = RoundTrip()
    reply = allow_in(rt, name, trial_lease_s=trial_lease_s)
    rt.execute()
    allowed, state, _trial = reply.value
    return allowed, state


def allow_in(rt: RoundTrip, name: str, *, trial_lease_s: float = 60.0) -> Reply:
    """``allow`` as part of ``rt``; the reply is (allowed, effective state, whether this caller got the trial)."""

    def after(raw: list) -> tuple[bool, str, bool]:
        allowed, state, trial = raw
        return bool(allowed), state.decode() if isinstance(state, bytes) else state, bool(trial)

    return rt.script(
        _scripts()["allow"], keys=_keys(name), args=[HISTORY_MAX, TTL_S, max(trial_lease_s, 1.0)], then=after
    )


def return_trial(name: str) -> None:
    """Hand back a half-open trial this caller got but will not use (it found no backend slot), so the
    next caller gets it at once instead of after the trial's lease."""
    _scripts()["return_trial"](keys=_keys(name), args=[])


def record(name: str, *, ok: bool, config: CircuitConfig | None = None, error: str = "") -> str:
    """Fold one finished call into the breaker; returns the state after it."""
    rt = RoundTrip()
    reply = record_in(rt, name, ok=ok, config=config, error=error)
    rt.execute()
    return reply.value


def record_in(rt: RoundTrip, name: str, *, ok: bool, config: CircuitConfig | None = None, error: str = "") -> Reply:
    """``record`` as part of ``rt`` (sent with the caller's other commands); the reply is the state after."""
    cfg = config or CircuitConfig()

    def after(state: bytes | str) -> str:
        state = state.decode() if isinstance(state, bytes) else state
        if state == OPEN and not ok:
            log.info("circuit open", extra={"backend": name, "error": error[:REASON_MAX]})
        return state

    return rt.script(
        _scripts()["record"],
        keys=_keys(name),
        args=[
            HISTORY_MAX,
            TTL_S,
            "1" if ok else "0",
            cfg.failures,
            cfg.window,
            cfg.min_calls,
            cfg.error_rate,
            cfg.cooldown_s,
            (error or "error")[:REASON_MAX],
        ],
        then=after,
    )


def reset(name: str, *, reason: str = "closed by an operator") -> None:
    """Close the circuit and forget its recent calls (an operator knows the backend is back)."""
    _scripts()["reset"](keys=_keys(name), args=[HISTORY_MAX, TTL_S, reason[:REASON_MAX]])


def status(name: str) -> CircuitStatus:
    """The circuit as an operator should see it, with its history (read-only: changes nothing)."""
    client = redis_client()
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(circuit_key(name))
    pipe.lrange(history_key(name), 0, HISTORY_MAX - 1)
    pipe.time()
    raw, history, (secs, micros) = pipe.execute()
    h = {k.decode(): v.decode() for k, v in raw.items()}
    now = secs + micros / 1_000_000
    stored = h.get("state", CLOSED)
    open_until = _float(h.get("open_until"))
    effective = HALF_OPEN if stored == OPEN and open_until is not None and now >= open_until else stored
    transitions = []
    for item in history:
        try:
            e = json.loads(item)
            transitions.append(Transition(float(e["at"]), e["from"], e["to"], e.get("reason", "")))
        except (ValueError, KeyError, TypeError):
            continue
    return CircuitStatus(
        state=effective,
        stored_state=stored,
        failures=int(h.get("failures") or 0),
        opened_at=_float(h.get("opened_at")),
        open_until=open_until,
        reason=h.get("reason", ""),
        history=transitions,
    )


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
