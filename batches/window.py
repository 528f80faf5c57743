"""A batch's window: at most ``BATCH_WINDOW`` of its lines on the queue at once, the rest held.

Every line is a job in the database from the start (``queued``), but only the lines in the window
are pushed on the fair queue; the others are *held*: ``queued`` with no ``enqueued_at`` (the
``job_batch_held`` partial index holds exactly them). As lines end, held ones are pushed in
``custom_id`` order, with their enqueue time then, so:

- Redis holds at most ``BATCH_WINDOW`` RQ jobs per batch, not 50,000;
- a job the tenant submits later (at the batch's priority or any other) waits behind at most the
  window, not behind the whole backlog (within a tenant a sub-queue is FIFO);
- between tenants nothing changes: the window keeps the tenant's sub-queue non-empty, so the fair
  queue serves it its share, as it would a full backlog.

``window`` in the batch's progress hash (``batches.progress``) counts the lines pushed and not
ended. ``reserve`` takes room in it atomically, so racing refills never push more than the window;
a refill of one batch also runs under its row's lock (the ``updated_at`` write that also tells the
reconciler the batch is alive), so two never pick the same held lines. A line's end gives its room
back (``progress.COUNT``); the one that leaves ``REFILL_STEP`` of room pushes that many held lines.
The counter is only a throttle: the reconciler recounts it from the rows for a batch nobody wrote
for a while (``resync``), so a count lost with Redis, or a push that failed, delays lines but never
strands them. Held lines expire and cancel as any queued job does (they are rows; leaving a queue
they are not on is a no-op), and the reconciler never pushes them as lost.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone
from redis.exceptions import RedisError

from batches.models import Batch, BatchStatus
from jobs import services
from jobs.models import ACTIVE_STATES, Job, JobState
from orchestrator_site.redis import key, redis_client

log = logging.getLogger(__name__)

# What pushing a line needs (queueing.enqueue and the submission metrics), nothing more.
PUSH_FIELDS = (
    "id",
    "queue",
    "rq_job_id",
    "timeout_s",
    "priority",
    "policy_name",
    "backend_name",
    "tenant_id",
    "batch_id",
    "created_at",
    "enqueued_at",
)

# KEYS: the batch's progress hash. ARGV: lines wanted, window size. Takes room for up to that many
# lines; returns how many (0: no room), or -1 when the hash is gone (the reconciler rebuilds it).
RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local inflight = tonumber(redis.call('HGET', KEYS[1], 'window') or '0') or 0
local r = math.min(tonumber(ARGV[2]) - inflight, tonumber(ARGV[1]))
if r <= 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'window', r)
return r
"""

# KEYS: the hash. ARGV: lines. Room taken but not used goes back (never below zero).
GIVE_BACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local w = redis.call('HINCRBY', KEYS[1], 'window', -tonumber(ARGV[1]))
if w < 0 then redis.call('HSET', KEYS[1], 'window', 0) end
return 1
"""


def size() -> int:
    return int(settings.BATCH_WINDOW)


def refill_step() -> int:
    """Room that triggers a refill: a tenth of the window, so a refill pushes lines in bulk."""
    return max(1, size() // 10)


def hash_key(batch_id: str) -> str:
    """The batch's progress hash (``batches.progress``), which holds the window's count too."""
    return key("batch", batch_id)


_key = hash_key


def reserve(batch_id: str, wanted: int) -> int:
    """Room for up to ``wanted`` lines, taken; -1 when the counts hash is gone."""
    if wanted <= 0:
        return 0
    return int(redis_client().eval(RESERVE, 1, _key(batch_id), wanted, size()))


def give_back(batch_id: str, lines: int) -> None:
    if lines > 0:
        try:
            redis_client().eval(GIVE_BACK, 1, _key(batch_id), lines)
        except RedisError as exc:  # the reconciler recounts it
            log.warning("batch window not given back", extra={"batch_id": batch_id, "error": str(exc)})


def push(batch_id: str, lines: list[Job]) -> None:
    """Push ``lines`` (marked enqueued, room reserved, committed) in one pipeline. A push that fails
    leaves them held again and gives their room back: a later refill or the reconciler pushes them."""
    if not lines:
        return
    pipe = redis_client().pipeline()
    services.enqueue_created(lines, pipe)
    try:
        pipe.execute()
    except RedisError as exc:
        log.error("batch lines not pushed; held again", extra={"batch_id": batch_id, "error": str(exc)})
        at = lines[0].enqueued_at
        Job.objects.filter(pk__in=[j.pk for j in lines], state=JobState.QUEUED, enqueued_at=at).update(enqueued_at=None)
        give_back(batch_id, len(lines))


def held(batch_id: str):
    """The batch's held lines that may still run, in the order they are pushed."""
    now = timezone.now()
    return (
        Job.objects.filter(batch_id=batch_id, state=JobState.QUEUED, enqueued_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .order_by("custom_id")
    )


def refill(batch_id: str, *, resync: bool = False) -> int:
    """Push held lines into the window's free room (``resync``: recount the window from the rows
    first); returns how many were pushed. Only for a batch ``in_progress`` within its window."""
    now = timezone.now()
    lines: list[Job] = []
    with transaction.atomic():
        # the row lock: one refill of a batch at a time (and the reconciler sees the batch alive)
        alive = Batch.objects.filter(pk=batch_id, status=BatchStatus.IN_PROGRESS, expires_at__gt=now)
        if not alive.update(updated_at=now):
            return 0
        if resync:
            _resync(batch_id)
        try:
            room = reserve(batch_id, size())
        except RedisError as exc:  # held: the reconciler's resync pushes them
            log.error("batch window not refilled", extra={"batch_id": batch_id, "error": str(exc)})
            return 0
        if room <= 0:
            return 0
        try:
            lines = list(held(batch_id).only(*PUSH_FIELDS)[:room])
            # marked inside the lock: the next refill of this batch no longer sees them as held
            Job.objects.filter(pk__in=[j.pk for j in lines]).update(enqueued_at=now)
        except Exception:
            give_back(batch_id, room)
            raise
        give_back(batch_id, room - len(lines))
        if len(lines) < room:
            _mark_drained(batch_id)
    for job in lines:
        job.enqueued_at = now
    push(batch_id, lines)
    return len(lines)


def _resync(batch_id: str) -> None:
    """The window counted again from the rows (its lines pushed and not ended), when the hash exists
    (``progress.rebuild`` writes a lost one first)."""
    pushed = Job.objects.filter(batch_id=batch_id, state__in=ACTIVE_STATES, enqueued_at__isnull=False).count()
    redis_client().eval(
        "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'window', ARGV[1], 'drained', 0) end",
        1,
        _key(batch_id),
        pushed,
    )


def _mark_drained(batch_id: str) -> None:
    """Nothing is held any more (once the lines are all created): line ends stop asking for refills."""
    if Batch.objects.filter(pk=batch_id, lines_created__gte=F("total")).exists():
        redis_client().hset(_key(batch_id), "drained", 1)
