"""Where jobs wait: per-tenant sub-queues on Redis, served by weight within a priority.

RQ keeps one FIFO list per queue, so one tenant's backlog of thousands delays everybody else's next
job by the whole backlog. Here each RQ queue name (``high``, ``normal``, ``low``, ``<pool>-<priority>``)
holds one sub-queue per tenant and workers take the next job by **stride scheduling** (deficit round
robin's smooth form): every tenant waiting at that queue has a *pass*; the one with the lowest pass is
served and its pass grows by ``1 / weight``. A tenant that starts waiting enters at the pass of the
last job served (never below its own last pass, so emptying and refilling gains nothing), so its new
job runs after at most about one dispatch per active tenant. With weights 3:1 and both backlogged,
the first gets three dispatches in four.

Between queues the worker's order is strict (high before normal before low) with **aging**: a job
that has waited longer than ``MAX_STARVATION_S`` in a queue after the first non-empty one is served
next (the oldest such first), so sustained ``high`` traffic cannot starve ``low`` for ever.

Every move is one Lua script, atomic on Redis, and pipelines with the submission's other writes.
The keys of queue ``Q`` (prefix ``llmo:fq:``):

- ``q:Q:t:<tenant>`` sorted set: job id -> enqueue time (µs); FIFO within the tenant.
- ``q:Q:active`` sorted set: tenant -> pass, for tenants with jobs waiting.
- ``q:Q:heads`` sorted set: tenant -> enqueue time of its oldest job (aging, queue position).
- ``q:Q:pass`` hash: tenant -> pass when it stopped waiting; ``q:Q:vt``: the pass last served.
- ``q:Q:n``: jobs waiting at ``Q``; ``tenant:<tenant>:queued``: jobs a tenant has waiting anywhere.
- ``q:Q:batch`` set: the waiting jobs that are batch lines (pushed with ``batch=True``), counted
  apart in ``q:Q:bn`` and ``tenant:<tenant>:batched``, so admission can leave them out of
  ``max_queued`` and ``QUEUE_MAX_DEPTH`` (a batch's backlog never refuses interactive traffic).
- ``bell:Q``: a short list a push rings and an idle worker blocks on (BLPOP), so it wakes at once.
- ``drain:Q:<10 s bucket>``: jobs taken, for the drain rate behind ETAs and ``Retry-After``.
- ``weights`` hash: tenant -> fair-share weight (refreshed by every push and by a tenant's save).

The job's RQ hash is still RQ's (``rq:job:<id>``, with the trace context in its meta); only the
list RQ would push its id on is replaced. Jobs already on RQ's own list (``rq:queue:Q``, from
before this layout, or any RQ job that is not ours) are taken after a queue's sub-queues are empty.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from redis import Redis
from redis.client import Pipeline

from orchestrator_site.redis import key, redis_client, reply_text

PREFIX = key("fq") + ":"
NO_TENANT = "-"  # jobs of users in no tenant share one sub-queue
BELL_CAP = 64  # pending wake-ups kept per queue: enough to wake every idle worker of a burst soon
DRAIN_BUCKET_S = 10
DRAIN_WINDOW_BUCKETS = 6  # the drain rate is measured over the last minute
POSITION_SCAN_MAX = 100  # tenants counted one by one for a queue position; the rest as a group

_LIB = """
local P = ARGV[1]
local function qkey(q, part) return P .. 'q:' .. q .. ':' .. part end
local function weight(t)
  local w = tonumber(redis.call('HGET', P .. 'weights', t) or '1') or 1
  if w <= 0 then return 1 end
  return w
end
local function refresh_head(q, t)
  local head = redis.call('ZRANGE', qkey(q, 't:' .. t), 0, 0, 'WITHSCORES')
  if #head > 0 then
    redis.call('ZADD', qkey(q, 'heads'), head[2], t)
    return true
  end
  local pass = redis.call('ZSCORE', qkey(q, 'active'), t)
  if pass then redis.call('HSET', qkey(q, 'pass'), t, pass) end
  redis.call('ZREM', qkey(q, 'active'), t)
  redis.call('ZREM', qkey(q, 'heads'), t)
  return false
end
local function forget(q, t, job)
  redis.call('DECR', qkey(q, 'n'))
  redis.call('DECR', P .. 'tenant:' .. t .. ':queued')
  if redis.call('SREM', qkey(q, 'batch'), job) == 1 then
    redis.call('DECR', qkey(q, 'bn'))
    redis.call('DECR', P .. 'tenant:' .. t .. ':batched')
    return '1'
  end
  return ''
end
"""

# ARGV: prefix, queue, tenant, job id, score (µs), weight ('' keeps the stored one), bell cap, batch ('1' or '')
_PUSH = (
    _LIB
    + """
local q, t, job, score, w = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if w ~= '' then redis.call('HSET', P .. 'weights', t, w) end
if redis.call('ZADD', qkey(q, 't:' .. t), score, job) == 1 then
  redis.call('INCR', qkey(q, 'n'))
  redis.call('INCR', P .. 'tenant:' .. t .. ':queued')
  if ARGV[8] == '1' and redis.call('SADD', qkey(q, 'batch'), job) == 1 then
    redis.call('INCR', qkey(q, 'bn'))
    redis.call('INCR', P .. 'tenant:' .. t .. ':batched')
  end
end
if not redis.call('ZSCORE', qkey(q, 'active'), t) then
  local saved = tonumber(redis.call('HGET', qkey(q, 'pass'), t) or '0') or 0
  local vt = tonumber(redis.call('GET', qkey(q, 'vt')) or '0') or 0
  redis.call('ZADD', qkey(q, 'active'), math.max(saved, vt), t)
end
refresh_head(q, t)
redis.call('SADD', P .. 'queues', q)
redis.call('LPUSH', P .. 'bell:' .. q, '1')
redis.call('LTRIM', P .. 'bell:' .. q, 0, tonumber(ARGV[7]) - 1)
return 1
"""
)

# ARGV: prefix, now (µs), starvation (µs), n, drain bucket, drain ttl, queue 1..k (the worker's order)
_TAKE = (
    _LIB
    + """
local now, starve, n, bucket, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local queues = {}
for i = 7, #ARGV do queues[#queues + 1] = ARGV[i] end
local out = {}
local function serve(q, t)
  local popped = redis.call('ZPOPMIN', qkey(q, 't:' .. t))
  if #popped == 0 then refresh_head(q, t) return false end
  local pass = tonumber(redis.call('ZSCORE', qkey(q, 'active'), t) or redis.call('GET', qkey(q, 'vt')) or '0') or 0
  redis.call('SET', qkey(q, 'vt'), pass)
  redis.call('ZADD', qkey(q, 'active'), pass + 1 / weight(t), t)
  refresh_head(q, t)
  local batch = forget(q, t, popped[1])
  local drain = P .. 'drain:' .. q .. ':' .. bucket
  redis.call('INCR', drain)
  redis.call('EXPIRE', drain, ttl)
  out[#out + 1] = {q, popped[1], t, popped[2], batch}
  return true
end
while #out < n do
  local first, old_q, old_t, old_s = nil, nil, nil, nil
  for _, q in ipairs(queues) do
    if redis.call('ZCARD', qkey(q, 'active')) > 0 then
      if not first then
        first = q
      else
        local h = redis.call('ZRANGE', qkey(q, 'heads'), 0, 0, 'WITHSCORES')
        if #h > 0 and now - tonumber(h[2]) > starve and (not old_s or tonumber(h[2]) < old_s) then
          old_q, old_t, old_s = q, h[1], tonumber(h[2])
        end
      end
    end
  end
  if old_q then
    serve(old_q, old_t)
  elseif first then
    serve(first, redis.call('ZRANGE', qkey(first, 'active'), 0, 0)[1])
  else
    local legacy = nil
    for _, q in ipairs(queues) do
      legacy = redis.call('LPOP', 'rq:queue:' .. q)
      if legacy then out[#out + 1] = {q, legacy, '', '', ''} break end
    end
    if not legacy then break end
  end
end
return out
"""
)

# ARGV: prefix, queue, tenant, job id
_REMOVE = (
    _LIB
    + """
local q, t = ARGV[2], ARGV[3]
if redis.call('ZREM', qkey(q, 't:' .. t), ARGV[4]) == 0 then return 0 end
forget(q, t, ARGV[4])
refresh_head(q, t)
return 1
"""
)

# ARGV: prefix, queue, tenant, job id, scan max, after, higher queue 1..k. Returns the 1-based position or -1.
# A job id '' asks for a job that is not queued yet: the one `after` jobs behind the tenant's last waiting one.
# Its work is bounded: the `scan` tenants with the lowest passes (the most dispatches ahead of the job)
# are counted exactly, in a few calls whatever their number (one range, one HMGET of their weights, a
# ZCARD only where a tenant could be owed more than its one waiting job); the tenants past them are
# estimated as a group (see `position`). A script that read every tenant would block Redis for as long.
_POSITION = (
    _LIB
    + """
local q, t, job, scan = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local sub = qkey(q, 't:' .. t)
local rank
if job == '' then rank = redis.call('ZCARD', sub) + tonumber(ARGV[6]) else rank = redis.call('ZRANK', sub, job) end
if not rank then return -1 end
local active = qkey(q, 'active')
local pass = tonumber(redis.call('ZSCORE', active, t) or redis.call('GET', qkey(q, 'vt')) or '0') or 0
local target = pass + rank / weight(t)
local ahead, counted, wsum = rank, 0, 0
-- a bound written in full (Lua would print 14 digits), a hair above: passes equal to the target are ties
local upto = string.format('%.17g', target + 1e-9)
local others = redis.call('ZRANGEBYSCORE', active, '-inf', upto, 'WITHSCORES', 'LIMIT', 0, scan + 1)
local names, passes = {}, {}
for i = 1, #others, 2 do
  if others[i] ~= t and #names < scan then
    names[#names + 1] = others[i]
    passes[#passes + 1] = tonumber(others[i + 1])
  end
end
local weights = {}
if #names > 0 then weights = redis.call('HMGET', P .. 'weights', unpack(names)) end
for i, u in ipairs(names) do
  local up = passes[i]
  local w = tonumber(weights[i] or '1') or 1
  if w <= 0 then w = 1 end
  wsum = wsum + w
  -- u's dispatches with a pass below the job's come first; on a tie the lower name does
  local x = (target - up) * w
  local whole = math.floor(x + 0.5)
  local before = math.ceil(x - 1e-9)
  if math.abs(x - whole) < 1e-9 and u < t then before = whole + 1 end
  -- an active tenant has a job waiting, so only a larger share needs its backlog's size
  if before > 1 then before = math.min(before, redis.call('ZCARD', qkey(q, 't:' .. u))) end
  before = math.max(before, 0)
  ahead = ahead + before
  counted = counted + before
end
local rest = redis.call('ZCOUNT', active, '-inf', upto) - #names - 1
if rest > 0 and #names > 0 then
  -- past the scan, passes are at or above the last one counted: each of those tenants is owed at most
  -- its dispatches from there (at the mean weight counted), and together no more jobs than they hold
  local each = math.ceil((target - passes[#names]) * wsum / #names)
  local held = (tonumber(redis.call('GET', qkey(q, 'n')) or '0') or 0) - redis.call('ZCARD', sub) - counted
  ahead = ahead + math.max(0, math.min(rest * each, held))
end
for i = 7, #ARGV do
  ahead = ahead + math.max(0, tonumber(redis.call('GET', qkey(ARGV[i], 'n')) or '0') or 0)
end
return ahead + 1
"""
)

_scripts: dict[str, Any] = {}


def _script(name: str, source: str) -> Any:
    script = _scripts.get(name)
    if script is None:
        script = _scripts[name] = redis_client().register_script(source)
    return script


@dataclass(frozen=True)
class Taken:
    """A job taken off a queue, with what putting it back exactly where it was needs."""

    queue: str
    job_id: str
    tenant: str  # '' for a job taken from RQ's own list
    score: str
    batch: str = ""  # '1' for a batch line (it goes back counted as one)


def tenant_key(tenant_id: int | None) -> str:
    return str(tenant_id) if tenant_id is not None else NO_TENANT


def score_of(when_s: float) -> str:
    """The enqueue time as a sorted-set score: whole microseconds, exact in a double."""
    return str(int(when_s * 1_000_000))


def push(
    queue: str,
    tenant: str,
    job_id: str,
    score: str,
    *,
    weight: int | None = None,
    batch: bool = False,
    pipeline: Pipeline | None = None,
) -> None:
    """Put ``job_id`` in ``tenant``'s sub-queue of ``queue`` (again: a no-op but for the bell).

    ``batch``: the job is a batch line, counted apart from the jobs admission limits (see above).
    """
    args = [PREFIX, queue, tenant, job_id, score, "" if weight is None else str(weight), BELL_CAP, "1" if batch else ""]
    if pipeline is not None:
        # As status_mirror.write: a Script in a pipeline costs a SCRIPT EXISTS round trip each
        # time the pipeline runs (a submit's after-commit one among them); EVAL carries the body.
        pipeline.eval(_PUSH, 0, *args)
        return
    _script("push", _PUSH)(args=args, client=redis_client())


def take(queues: Sequence[str], n: int = 1, *, client: Redis | None = None) -> list[Taken]:
    """Take up to ``n`` jobs across ``queues`` (in the worker's priority order), fairly, with aging."""
    now = time.time()
    rows = _script("take", _TAKE)(
        args=[
            PREFIX,
            int(now * 1_000_000),
            int(float(settings.MAX_STARVATION_S) * 1_000_000),
            n,
            int(now // DRAIN_BUCKET_S),
            DRAIN_BUCKET_S * (DRAIN_WINDOW_BUCKETS + 2),
            *queues,
        ],
        client=client or redis_client(),
    )
    return [Taken(*(reply_text(v) for v in row)) for row in rows]


def put_back(taken: Iterable[Taken], *, client: Redis | None = None) -> None:
    """Return taken jobs where they were: the same tenant and enqueue time, so the same place."""
    pipe = (client or redis_client()).pipeline(transaction=False)
    for t in reversed(list(taken)):
        if t.tenant:
            push(t.queue, t.tenant, t.job_id, t.score, batch=t.batch == "1", pipeline=pipe)
        else:
            pipe.lpush(f"rq:queue:{t.queue}", t.job_id)
    pipe.execute()


def remove(queue: str, tenant: str, job_id: str, *, pipeline: Pipeline | None = None) -> None:
    """Take a job that will not run (canceled, expired) out of its sub-queue."""
    _script("remove", _REMOVE)(
        args=[PREFIX, queue, tenant, job_id], client=pipeline if pipeline is not None else redis_client()
    )


def is_waiting(queue: str, tenant: str, job_id: str, *, pipeline: Pipeline) -> None:
    """Queue a ZSCORE on ``pipeline``: its reply is None when the job waits on no sub-queue."""
    pipeline.zscore(f"{PREFIX}q:{queue}:t:{tenant}", job_id)


def position(
    queue: str,
    tenant: str,
    job_id: str,
    higher: Sequence[str] = (),
    *,
    after: int = 0,
    pipeline: Pipeline | None = None,
) -> int | None:
    """Where a waiting job stands: 1 = next to be taken from ``queue`` and the ``higher`` queues before it
    (None: it waits nowhere). With ``pipeline``, the script is queued there and its reply is the raw
    position (``-1`` for nowhere). ``job_id`` ``''`` asks for a job not queued yet (a held batch
    line): the one that would stand ``after`` jobs behind the tenant's last waiting one.

    Approximate in three ways: it assumes the tenants' passes advance as they would if no new job
    arrived (a new tenant, or new jobs at a higher priority, move it back); it ignores aging; and
    it counts only the ``POSITION_SCAN_MAX`` tenants most ahead of the job one by one. The tenants
    past those are counted as a group, from a bound on each one's share (the last counted tenant's
    distance to the job, at the mean weight counted) and their jobs in all: with even backlogs that
    is within about one dispatch per tenant past the scan, either way; with very uneven backlogs
    and weights it runs high, by a tenth or so.
    """
    pos = _script("position", _POSITION)(
        args=[PREFIX, queue, tenant, job_id, POSITION_SCAN_MAX, after, *higher],
        client=pipeline if pipeline is not None else redis_client(),
    )
    if pipeline is not None:
        return None
    return int(pos) if int(pos) > 0 else None


def waiting_ids(queue: str, client: Redis | None = None) -> list[str]:
    """Every job id waiting at ``queue``, each tenant's in order (for operators and tests; O(backlog))."""
    client = client or redis_client()
    tenants = [reply_text(t) for t in client.zrange(f"{PREFIX}q:{queue}:active", 0, -1)]
    ids = [reply_text(i) for t in tenants for i in client.zrange(f"{PREFIX}q:{queue}:t:{t}", 0, -1)]
    return ids + [reply_text(i) for i in client.lrange(f"rq:queue:{queue}", 0, -1)]


def depth_key(queue: str) -> str:
    """Jobs waiting at ``queue`` (an integer string; absent = 0)."""
    return f"{PREFIX}q:{queue}:n"


def heads_key(queue: str) -> str:
    """Sorted set: tenant -> enqueue time (µs) of its oldest job waiting at ``queue``."""
    return f"{PREFIX}q:{queue}:heads"


def tenant_queued_key(tenant: str) -> str:
    """Jobs ``tenant`` has waiting, over every queue."""
    return f"{PREFIX}tenant:{tenant}:queued"


def batch_depth_key(queue: str) -> str:
    """Batch lines among the jobs waiting at ``queue`` (part of ``depth_key``'s count)."""
    return f"{PREFIX}q:{queue}:bn"


def tenant_batched_key(tenant: str) -> str:
    """Batch lines among the jobs ``tenant`` has waiting (part of ``tenant_queued_key``'s count)."""
    return f"{PREFIX}tenant:{tenant}:batched"


def bell_key(queue: str) -> str:
    return f"{PREFIX}bell:{queue}"


KNOWN_QUEUES_KEY = f"{PREFIX}queues"  # every queue a job was ever pushed on (for the depth gauges)


def depths(queues: Iterable[str], client: Redis | None = None) -> dict[str, int]:
    """Jobs waiting at each queue, RQ's own list included (one round trip)."""
    names = list(queues)
    pipe = (client or redis_client()).pipeline(transaction=False)
    for q in names:
        pipe.get(depth_key(q))
        pipe.llen(f"rq:queue:{q}")
    replies = pipe.execute()
    return {q: max(0, int(replies[2 * i] or 0)) + int(replies[2 * i + 1]) for i, q in enumerate(names)}


def drain_keys(queue: str, now_s: float | None = None) -> list[str]:
    """The drain counters of ``queue``'s last complete buckets (the current one is still filling)."""
    bucket = int((time.time() if now_s is None else now_s) // DRAIN_BUCKET_S)
    return [f"{PREFIX}drain:{queue}:{b}" for b in range(bucket - DRAIN_WINDOW_BUCKETS, bucket)]


def drain_rate_of(counts: Iterable[Any]) -> float:
    """Jobs per second from the replies of ``drain_keys`` (summed over any number of queues)."""
    window = DRAIN_BUCKET_S * DRAIN_WINDOW_BUCKETS
    total = sum(int(c or 0) for c in counts)
    return total / window


def drain_rate(queues: Iterable[str], client: Redis | None = None) -> float:
    """Jobs per second taken from ``queues`` over the last minute."""
    keys = [k for q in queues for k in drain_keys(q)]
    return drain_rate_of((client or redis_client()).mget(keys)) if keys else 0.0


def wait_for_push(queues: Sequence[str], timeout_s: float, client: Redis | None = None) -> bool:
    """Block until a push rings one of ``queues``' bells or ``timeout_s`` passes; True when rung."""
    return (client or redis_client()).blpop([bell_key(q) for q in queues], timeout=timeout_s) is not None


def set_weight(tenant: str, weight: int) -> None:
    """A tenant's new weight governs its next dispatch."""
    redis_client().hset(f"{PREFIX}weights", tenant, weight)
