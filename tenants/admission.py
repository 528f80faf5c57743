"""Admission control: a tenant's limits, checked when a job is submitted and settled when it ends.

Refusals that need no Redis come first and are pure (``check_request``, ``check_model``): a disabled
tenant, a priority above ``max_priority``, a pinned or model-named backend outside
``allowed_backends`` are a 403 (``TenantForbidden``). The counted limits are one Lua script
(``ADMIT``) that rides in the submission's first Redis round trip, beside the registry version read,
and also makes the idempotency claim, so a refused request leaves nothing behind: it checks
``rpm_limit`` (a sliding one-minute log), ``tokens_per_day`` (tokens reserved and used today, UTC),
``budget_usd`` (spend this day or month), ``max_queued`` (the tenant's waiting jobs) and the global
``QUEUE_MAX_DEPTH`` (jobs waiting at the job's priority over all its queues; batch lines count toward
neither: ``jobs.fair_queue`` counts them apart, see docs/batches.md), and only when all pass
claims the key and takes the reservations, atomically. Over any: a 429 (``AdmissionRefused``) with
``Retry-After``.

The keys (prefix ``llmo:adm:``), all with TTLs:

- ``t:<tenant>:rpm``: sorted set of the submissions of the last minute (job id -> ms).
- ``t:<tenant>:tok:<YYYYMMDD>``: tokens of the day's jobs: reserved while active, real once ended.
- ``t:<tenant>:usd:d:<YYYYMMDD>`` / ``usd:m:<YYYYMM>``: spend (micro-dollars) of the period's jobs.
- ``t:<tenant>:admitting``, ``p:<priority>:admitting``: jobs admitted but not yet on their queue
  (sorted sets, entries expire after ``PENDING_MS``), so racing submissions cannot all see room.

A job's tokens and cost count on the day (month) it was submitted. The day and period counters are
never created by the script: on a miss (a new day, or Redis lost them) it changes nothing and
answers ``miss``; the caller rebuilds the counter from the tenant's jobs of that period (one
aggregate over the ``(tenant, created_at)`` index), writes it with ``SET NX`` (the first rebuild
wins) and runs the script again. Settlement (``settle_ended``, a ``jobs.hooks`` callback) only
adjusts counters that exist, so a rebuilt counter never counts a job twice.
"""

from __future__ import annotations

import calendar
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db.models import F, Q, Sum, Value
from django.db.models.functions import Coalesce
from django.utils import timezone
from redis.exceptions import RedisError

from jobs import fair_queue, idempotency
from jobs.models import ACTIVE_STATES, Job
from orchestrator_site.redis import Reply, RoundTrip, key, redis_client, reply_text
from tenants.models import BudgetPeriod, Tenant

if TYPE_CHECKING:
    from routing.registry import Snapshot

log = logging.getLogger(__name__)

PREFIX = key("adm") + ":"
RPM_WINDOW_MS = 60_000
PENDING_MS = 30_000  # an admitted job not on its queue by then (its request failed) stops counting
UNKNOWN_DRAIN_RETRY_S = 5  # Retry-After for a full queue when nothing drained in the last minute
MAX_RETRY_S = 24 * 3600
MICRO = Decimal(1_000_000)

OFF = -1  # a counted limit the script skips

LIMITS = ("rpm_limit", "tokens_per_day", "budget_usd", "max_queued", "queue_max_depth")

# ARGV: prefix, now (ms), job id, idempotency key ('' none), fingerprint, idempotency ttl, tenant ('' none),
# rpm limit (-1 off), token key ('' off), token limit, token reservation, seconds to the day's end,
# spend key ('' off), budget (µ$), seconds to the period's end, max queued (-1 off), the tenant's
# queued-jobs key, queue max depth (-1 off), priority, pending ms, drain window s, n, then n depth keys
# of the priority's queues, then their n batch-line depth keys, then the tenant's batch-lines key, then
# the queues' drain counters. Batch lines waiting are subtracted from both counts.
# Returns {'ok'} | {'dup'} (the key exists: a replay) | {'miss', limit} | {'refuse', limit, retry s, used, cap}.
ADMIT = """
local P, now, job = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local idem, fp, idem_ttl, t = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local rpm = tonumber(ARGV[8])
local tok_key, tok_limit, tok_need, day_left = ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local usd_key, usd_limit, period_left = ARGV[13], tonumber(ARGV[14]), tonumber(ARGV[15])
local max_q, queued_key, max_d, prio = tonumber(ARGV[16]), ARGV[17], tonumber(ARGV[18]), ARGV[19]
local pending_ms, window, nq = tonumber(ARGV[20]), tonumber(ARGV[21]), tonumber(ARGV[22])
local function num(v) return tonumber(v or '0') or 0 end
local function drain_wait(excess)
  local total = 0
  for i = 24 + 2 * nq, #ARGV do total = total + num(redis.call('GET', ARGV[i])) end
  if total <= 0 then return -1 end
  return math.ceil(excess * window / total)
end
if idem ~= '' and redis.call('EXISTS', idem) == 1 then return {'dup'} end
if tok_key ~= '' and redis.call('EXISTS', tok_key) == 0 then return {'miss', 'tokens_per_day'} end
if usd_key ~= '' and redis.call('EXISTS', usd_key) == 0 then return {'miss', 'budget_usd'} end
local rpm_key = P .. 't:' .. t .. ':rpm'
if rpm == 0 then return {'refuse', 'rpm_limit', 60, 0, 0} end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', rpm_key, '-inf', now - 60000)
  local n = redis.call('ZCARD', rpm_key)
  if n >= rpm then
    local e = redis.call('ZRANGE', rpm_key, n - rpm, n - rpm, 'WITHSCORES')
    return {'refuse', 'rpm_limit', math.ceil((tonumber(e[2]) + 60000 - now) / 1000), n, rpm}
  end
end
if tok_key ~= '' then
  local used = num(redis.call('GET', tok_key))
  if used + tok_need > tok_limit then return {'refuse', 'tokens_per_day', day_left, used, tok_limit} end
end
if usd_key ~= '' then
  local spent = num(redis.call('GET', usd_key))
  if spent >= usd_limit then return {'refuse', 'budget_usd', period_left, spent, usd_limit} end
end
local tq = P .. 't:' .. t .. ':admitting'
if max_q >= 0 then
  redis.call('ZREMRANGEBYSCORE', tq, '-inf', now - pending_ms)
  local waiting = num(redis.call('GET', queued_key)) - math.max(0, num(redis.call('GET', ARGV[23 + 2 * nq])))
  local n = math.max(0, waiting) + redis.call('ZCARD', tq)
  if n >= max_q then return {'refuse', 'max_queued', drain_wait(n - max_q + 1), n, max_q} end
end
local pq = P .. 'p:' .. prio .. ':admitting'
if max_d >= 0 then
  redis.call('ZREMRANGEBYSCORE', pq, '-inf', now - pending_ms)
  local n = redis.call('ZCARD', pq)
  for i = 23, 22 + nq do
    n = n + math.max(0, num(redis.call('GET', ARGV[i])) - math.max(0, num(redis.call('GET', ARGV[i + nq]))))
  end
  if n >= max_d then return {'refuse', 'queue_max_depth', drain_wait(n - max_d + 1), n, max_d} end
end
if idem ~= '' then redis.call('SET', idem, fp, 'EX', idem_ttl) end
if rpm > 0 then
  redis.call('ZADD', rpm_key, now, job)
  redis.call('PEXPIRE', rpm_key, 61000)
end
if tok_key ~= '' and tok_need > 0 then redis.call('INCRBY', tok_key, tok_need) end
if max_q >= 0 then
  redis.call('ZADD', tq, now, job)
  redis.call('PEXPIRE', tq, pending_ms)
end
if max_d >= 0 then
  redis.call('ZADD', pq, now, job)
  redis.call('PEXPIRE', pq, pending_ms)
end
return {'ok'}
"""

# ARGV: key, delta, key, delta, ...: add to the counters that exist (a missing one is rebuilt from the rows).
ADJUST = """
for i = 1, #ARGV, 2 do
  if redis.call('EXISTS', ARGV[i]) == 1 then redis.call('INCRBY', ARGV[i], ARGV[i + 1]) end
end
return 1
"""

_scripts: dict[str, Any] = {}


def _script(name: str) -> Any:
    script = _scripts.get(name)
    if script is None:
        script = _scripts[name] = redis_client().register_script({"admit": ADMIT, "adjust": ADJUST}[name])
    return script


# --- refusals ----------------------------------------------------------------------------------
class TenantForbidden(Exception):
    """403: the tenant may not do this at all (``limit`` names the rule)."""

    status = 403

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.message, self.limit = message, limit

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, "limit": self.limit}


class AdmissionRefused(Exception):
    """429: over a counted limit; it would pass in about ``retry_after`` seconds."""

    status = 429

    def __init__(self, message: str, limit: str, retry_after: int):
        super().__init__(message)
        self.message, self.limit, self.retry_after = message, limit, max(1, min(int(retry_after), MAX_RETRY_S))

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, "limit": self.limit, "retry_after": self.retry_after}


def check_request(tenant: Tenant | None, data: dict[str, Any]) -> None:
    """The 403s that need only the request and the tenant (no I/O)."""
    if tenant is None:
        return
    if not tenant.enabled:
        raise TenantForbidden(f"Tenant {tenant.name!r} is disabled.", "enabled")
    priority = data.get("priority") or "normal"
    if not tenant.allows_priority(priority):
        raise TenantForbidden(
            f"Priority {priority!r} is above tenant {tenant.name!r}'s max_priority {tenant.max_priority!r}.",
            "max_priority",
        )
    pinned = data.get("backend") or ""
    if pinned and not tenant.allows_backend(pinned):
        raise TenantForbidden(
            f"Backend {pinned!r} is not among tenant {tenant.name!r}'s allowed_backends.", "allowed_backends"
        )


def check_model(tenant: Tenant | None, model: str, snap: Snapshot) -> None:
    """403 when ``model`` is served only by backends the tenant may not use (and some serve it by name)."""
    if tenant is None or not model or not tenant.allowed_backends:
        return
    named = [c.name for c in snap.candidates if c.model == model]
    if named and not any(tenant.allows_backend(c.name) for c in snap.candidates if c.model in (model, "")):
        raise TenantForbidden(
            f"Model {model!r} is served only by backends outside tenant {tenant.name!r}'s allowed_backends"
            f" ({', '.join(sorted(named))}).",
            "allowed_backends",
        )


# --- periods and keys --------------------------------------------------------------------------
def day_of(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def month_of(when: datetime) -> datetime:
    return day_of(when).replace(day=1)


def period_bounds(period: str, when: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the UTC day or month holding ``when``."""
    if period == BudgetPeriod.DAY:
        start = day_of(when)
        return start, start + timedelta(days=1)
    start = month_of(when)
    return start, start + timedelta(days=calendar.monthrange(start.year, start.month)[1])


def tokens_key(tenant_id: int, when: datetime) -> str:
    return f"{PREFIX}t:{tenant_id}:tok:{day_of(when):%Y%m%d}"


def spend_key(tenant_id: int, period: str, when: datetime) -> str:
    if period == BudgetPeriod.DAY:
        return f"{PREFIX}t:{tenant_id}:usd:d:{day_of(when):%Y%m%d}"
    return f"{PREFIX}t:{tenant_id}:usd:m:{month_of(when):%Y%m}"


def micro_usd(cost: Decimal | float | None) -> int:
    """Dollars as whole micro-dollars, rounded up (a counter in Redis stays an integer)."""
    if not cost:
        return 0
    return int((Decimal(str(cost)) * MICRO).to_integral_value(rounding=ROUND_CEILING))


def reservation(data: dict[str, Any]) -> int:
    """Tokens a job reserves against ``tokens_per_day`` until it ends: its ``max_tokens``, else the default."""
    return int(data.get("max_tokens") or settings.TOKEN_RESERVATION_DEFAULT)


def priority_queues(priority: str) -> list[str]:
    """Every queue jobs of ``priority`` wait at: the plain one and each pool's."""
    return [priority, *(f"{pool}-{priority}" for pool in settings.WORKER_POOLS)]


def has_limits(tenant: Tenant | None) -> bool:
    """Whether a submission for ``tenant`` has anything to count (else the old round trip serves)."""
    if settings.QUEUE_MAX_DEPTH:
        return True
    return tenant is not None and any(
        v is not None for v in (tenant.rpm_limit, tenant.tokens_per_day, tenant.budget_usd, tenant.max_queued)
    )


# --- admission ---------------------------------------------------------------------------------
def _cap(value: int | None) -> int:
    return OFF if value is None else int(value)


@dataclass
class Ticket:
    """One submission's admission: queued on the first round trip, answered by ``outcome``."""

    tenant: Tenant | None
    job_id: str
    priority: str
    tokens: int  # reserved when tokens_per_day is set, else 0
    now: datetime
    idem_key: str = ""
    fingerprint: str = ""
    reply: Reply | None = None
    admitted: bool = False

    @property
    def _tid(self) -> str:
        return str(self.tenant.pk) if self.tenant is not None else ""

    def _tokens_key(self) -> str:
        t = self.tenant
        return tokens_key(t.pk, self.now) if t is not None and t.tokens_per_day is not None else ""

    def _spend_key(self) -> str:
        t = self.tenant
        return spend_key(t.pk, t.budget_period, self.now) if t is not None and t.budget_usd is not None else ""

    def queue_on(self, rt: RoundTrip) -> None:
        t = self.tenant
        queues = priority_queues(self.priority)
        depth = int(settings.QUEUE_MAX_DEPTH or 0) or OFF
        max_queued = _cap(t.max_queued if t is not None else None)
        drains = [k for q in queues for k in fair_queue.drain_keys(q)] if depth >= 0 or max_queued >= 0 else []
        day_end = period_bounds(BudgetPeriod.DAY, self.now)[1]
        period_end = period_bounds(t.budget_period, self.now)[1] if t is not None else day_end
        args = [
            PREFIX,
            int(self.now.timestamp() * 1000),
            self.job_id,
            self.idem_key,
            self.fingerprint,
            idempotency.PENDING_TTL_S,
            self._tid or fair_queue.NO_TENANT,
            _cap(t.rpm_limit if t is not None else None),
            self._tokens_key(),
            t.tokens_per_day if t is not None and t.tokens_per_day is not None else 0,
            self.tokens,
            math.ceil((day_end - self.now).total_seconds()),
            self._spend_key(),
            micro_usd(t.budget_usd) if t is not None and t.budget_usd is not None else 0,
            math.ceil((period_end - self.now).total_seconds()),
            max_queued,
            fair_queue.tenant_queued_key(fair_queue.tenant_key(t.pk if t is not None else None)),
            depth,
            self.priority,
            PENDING_MS,
            fair_queue.DRAIN_BUCKET_S * fair_queue.DRAIN_WINDOW_BUCKETS,
            len(queues),
            *(fair_queue.depth_key(q) for q in queues),
            *(fair_queue.batch_depth_key(q) for q in queues),
            fair_queue.tenant_batched_key(fair_queue.tenant_key(t.pk if t is not None else None)),
            *drains,
        ]
        self.reply = rt.script(_script("admit"), [], args)

    def outcome(self) -> str:
        """``ok`` (admitted), ``dup`` (the idempotency key exists) or ``miss:<limit>`` (rebuild, then again);
        raises ``AdmissionRefused``."""
        assert self.reply is not None
        raw = [reply_text(v) if isinstance(v, bytes) else v for v in self.reply.value]
        kind = raw[0]
        if kind == "ok":
            self.admitted = True
            return "ok"
        if kind == "dup":
            return "dup"
        if kind == "miss":
            return f"miss:{raw[1]}"
        limit, retry, used, cap = raw[1], int(raw[2]), int(raw[3]), int(raw[4])
        raise AdmissionRefused(self._explain(limit, used, cap), limit, retry if retry > 0 else UNKNOWN_DRAIN_RETRY_S)

    def _explain(self, limit: str, used: int, cap: int) -> str:
        name = self.tenant.name if self.tenant is not None else ""
        if limit == "rpm_limit":
            return f"Tenant {name!r} is over its rpm_limit ({cap} submissions per minute)."
        if limit == "tokens_per_day":
            return (
                f"Tenant {name!r} would exceed its tokens_per_day ({used} of {cap} used or reserved today;"
                f" this job reserves {self.tokens})."
            )
        if limit == "budget_usd":
            assert self.tenant is not None
            return (
                f"Tenant {name!r} has spent its budget_usd for this {self.tenant.budget_period}"
                f" (${Decimal(used) / MICRO:.4f} of ${Decimal(cap) / MICRO:.4f})."
            )
        if limit == "max_queued":
            return f"Tenant {name!r} has {used} jobs waiting; its max_queued is {max(cap, 0)}."
        return f"{used} {self.priority} jobs are waiting; QUEUE_MAX_DEPTH is {cap}."

    def rebuild(self, which: str) -> None:
        """Write a missing day or period counter from the tenant's rows (the first writer wins)."""
        assert self.tenant is not None
        if which == "tokens_per_day":
            rebuild_tokens(self.tenant.pk, self.now)
        else:
            rebuild_spend(self.tenant.pk, self.tenant.budget_period, self.now)

    def after_commit(self, pipe: Any) -> None:
        """The job is on its queue now (same pipeline, after the push): it stops counting as admitted-pending."""
        if not self.admitted:
            return
        if self.tenant is not None and self.tenant.max_queued is not None:
            pipe.zrem(f"{PREFIX}t:{self._tid}:admitting", self.job_id)
        if settings.QUEUE_MAX_DEPTH:
            pipe.zrem(f"{PREFIX}p:{self.priority}:admitting", self.job_id)

    def release(self, *, keep_idempotency: bool = False) -> None:
        """Undo an admission whose job was not created (one round trip; best effort)."""
        rt = RoundTrip()
        if self.idem_key and not keep_idempotency:
            rt.command("delete", self.idem_key)
        if self.admitted:
            tid = self._tid or fair_queue.NO_TENANT
            rt.command("zrem", f"{PREFIX}t:{tid}:rpm", self.job_id)
            rt.command("zrem", f"{PREFIX}t:{tid}:admitting", self.job_id)
            rt.command("zrem", f"{PREFIX}p:{self.priority}:admitting", self.job_id)
            if self._tokens_key() and self.tokens:
                rt.script(_script("adjust"), [], [self._tokens_key(), -self.tokens])
            self.admitted = False
        try:
            rt.execute()
        except RedisError as exc:  # the reservations time out with their keys
            log.warning("admission not released", extra={"job_id": self.job_id, "error": str(exc)})


def ticket(
    tenant: Tenant | None, data: dict[str, Any], job_id: str, *, idem_key: str = "", fingerprint: str = ""
) -> Ticket | None:
    """The admission of one submission, or None when nothing is counted for it."""
    if not has_limits(tenant):
        return None
    tokens = reservation(data) if tenant is not None and tenant.tokens_per_day is not None else 0
    return Ticket(
        tenant=tenant,
        job_id=job_id,
        priority=data.get("priority") or "normal",
        tokens=tokens,
        now=timezone.now(),
        idem_key=idem_key,
        fingerprint=fingerprint,
    )


# --- the counters from the rows ----------------------------------------------------------------
def _tenant_jobs(tenant_id: int, start: datetime, end: datetime):
    return Job.objects.filter(tenant_id=tenant_id, created_at__gte=start, created_at__lt=end)


def tokens_from_rows(tenant_id: int, when: datetime) -> int:
    """The day's tokens from the rows: reservations of active jobs, real usage of ended ones."""
    start, end = period_bounds(BudgetPeriod.DAY, when)
    used = Coalesce(F("prompt_tokens"), Value(0)) + Coalesce(F("completion_tokens"), Value(0))
    agg = _tenant_jobs(tenant_id, start, end).aggregate(
        reserved=Sum("reserved_tokens", filter=Q(state__in=ACTIVE_STATES)),
        used=Sum(used, filter=~Q(state__in=ACTIVE_STATES)),
    )
    return int(agg["reserved"] or 0) + int(agg["used"] or 0)


def spend_from_rows(tenant_id: int, period: str, when: datetime) -> Decimal:
    start, end = period_bounds(period, when)
    return _tenant_jobs(tenant_id, start, end).aggregate(s=Sum("cost"))["s"] or Decimal(0)


def _ttl(end: datetime, now: datetime) -> int:
    """Past the period's end by an hour, so a job ending just after midnight still settles on its day."""
    return max(60, math.ceil((end - now).total_seconds()) + 3600)


def rebuild_tokens(tenant_id: int, when: datetime) -> None:
    end = period_bounds(BudgetPeriod.DAY, when)[1]
    redis_client().set(
        tokens_key(tenant_id, when), tokens_from_rows(tenant_id, when), nx=True, ex=_ttl(end, timezone.now())
    )


def rebuild_spend(tenant_id: int, period: str, when: datetime) -> None:
    end = period_bounds(period, when)[1]
    value = micro_usd(spend_from_rows(tenant_id, period, when))
    redis_client().set(spend_key(tenant_id, period, when), value, nx=True, ex=_ttl(end, timezone.now()))


# --- settlement (jobs.hooks callbacks, registered in TenantsConfig.ready) -------------------------
def _adjustments(job: Job, sign: int) -> list[Any]:
    """Counter deltas for one job: ``sign`` -1 settles its end (reservation out, real usage in), +1 reopens it."""
    used = (job.prompt_tokens or 0) + (job.completion_tokens or 0)
    reserved = job.reserved_tokens or 0
    args: list[Any] = []
    when = job.created_at
    if sign < 0:
        if used - reserved:
            args += [tokens_key(job.tenant_id, when), used - reserved]
        cost = micro_usd(job.cost)
        if cost:  # either period's counter, whichever the tenant keeps
            args += [spend_key(job.tenant_id, "day", when), cost, spend_key(job.tenant_id, "month", when), cost]
    elif reserved:
        args += [tokens_key(job.tenant_id, when), reserved]
    return args


def _apply(jobs: Sequence[Job], sign: int) -> None:
    rt = RoundTrip()
    for job in jobs:
        if job.tenant_id is None:
            continue
        args = _adjustments(job, sign)
        if args:
            rt.script(_script("adjust"), [], args)
    try:
        rt.execute()
    except RedisError as exc:  # the counters are rebuilt from the rows when their keys expire
        log.warning("tenant usage not settled", extra={"jobs": len(jobs), "error": str(exc)})


def settle_ended(jobs: Sequence[Job]) -> None:
    """Jobs reached a final state (once each): their reservation gives way to their real usage and cost."""
    _apply(jobs, -1)


def reserve_reopened(jobs: Sequence[Job]) -> None:
    """Finished jobs were queued again (an operator's retry, outside admission): they reserve again."""
    _apply(jobs, +1)
