"""A batch's request counts while it runs, counted in Redis as its lines' jobs end.

``llmo:batch:<id>`` is a hash (``total``, ``completed``, ``failed``) written when the batch goes
``in_progress``. ``count_ended`` (a ``jobs.hooks.on_ended`` callback, once per job that ends) adds
each line's outcome with one script per batch in one pipeline: no database write per line. The
call that brings ``completed + failed`` to ``total`` enqueues the finalizer. The counts only
display progress and trigger finalizing: the finalizer reads the outcomes from the rows, so a lost
hash (Redis flushed) or a count twice costs nothing but time; the reconciler finalizes a batch
whose lines all ended without a trigger (``batches.recovery``), and ``counts`` falls back to the rows.

The hash also holds the batch's window (``batches.window``): ``window``, its lines pushed and not
ended, which every end lowers, and ``drained``, set once no line is held any more. The end that
leaves ``window.refill_step()`` of room pushes that many held lines.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from django.db.models import Count, Q
from redis.exceptions import RedisError

from batches import tasks, window
from jobs.models import JobState
from orchestrator_site.redis import redis_client

log = logging.getLogger(__name__)

# KEYS: the hash. ARGV: completed, failed. Adds only to a hash that exists; the lines' room in the window
# goes back (never below zero). Returns {done, total, window, drained} or {}.
COUNT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local c = redis.call('HINCRBY', KEYS[1], 'completed', ARGV[1])
local f = redis.call('HINCRBY', KEYS[1], 'failed', ARGV[2])
local w = redis.call('HINCRBY', KEYS[1], 'window', -(tonumber(ARGV[1]) + tonumber(ARGV[2])))
if w < 0 then
  redis.call('HSET', KEYS[1], 'window', 0)
  w = 0
end
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '-1')
return {c + f, total, w, tonumber(redis.call('HGET', KEYS[1], 'drained') or '0')}
"""


def counts_key(batch_id: str) -> str:
    return window.hash_key(batch_id)


def start(batch_id: str, total: int, ttl_s: int) -> None:
    """The batch is ``in_progress`` with ``total`` lines: its counts start at zero."""
    pipe = redis_client().pipeline()
    pipe.delete(counts_key(batch_id))
    pipe.hset(counts_key(batch_id), mapping={"total": total, "completed": 0, "failed": 0, "window": 0, "drained": 0})
    pipe.expire(counts_key(batch_id), ttl_s)
    pipe.execute()


def set_total(batch_id: str, total: int) -> bool:
    """Lower the total to the lines that exist (a cancel stopped their creation); whether all have ended."""
    client = redis_client()
    if not client.exists(counts_key(batch_id)):
        return False
    client.hset(counts_key(batch_id), "total", total)
    done = sum(int(v or 0) for v in client.hmget(counts_key(batch_id), "completed", "failed"))
    return done >= total


def add(batch_id: str, completed: int, failed: int) -> None:
    """Count outcomes that ended without a job move (lines created already failed); finalize when done."""
    _count({batch_id: [completed, failed]})


def rebuild(batch: Any, ttl_s: int) -> None:
    """A lost hash (Redis flushed) written again from the rows; the window is recounted after it."""
    client = redis_client()
    if client.exists(counts_key(batch.pk)):
        return
    counts = counts_from_rows(batch)
    pipe = client.pipeline()
    pipe.hsetnx(counts_key(batch.pk), "total", batch.total)
    pipe.hsetnx(counts_key(batch.pk), "completed", counts["completed"])
    pipe.hsetnx(counts_key(batch.pk), "failed", counts["failed"])
    pipe.expire(counts_key(batch.pk), ttl_s)
    pipe.execute()


def count_ended(jobs: Sequence[Any]) -> None:
    """Jobs ended (once each): their batches' counts go up; a batch whose lines all ended is finalized."""
    per_batch: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for job in jobs:
        if job.batch_id:
            per_batch[job.batch_id][0 if job.state == JobState.SUCCEEDED else 1] += 1
    if per_batch:
        _count(per_batch)


def _count(per_batch: dict[str, list[int]]) -> None:
    pipe = redis_client().pipeline(transaction=False)
    for batch_id, (completed, failed) in per_batch.items():
        pipe.eval(COUNT, 1, counts_key(batch_id), completed, failed)
    try:
        replies = pipe.execute()
    except RedisError as exc:  # the reconciler finalizes from the rows
        log.warning("batch counts not updated", extra={"batches": len(per_batch), "error": str(exc)})
        return
    step, size = window.refill_step(), window.size()
    for batch_id, reply in zip(per_batch, replies, strict=True):
        if reply and int(reply[1]) >= 0 and int(reply[0]) >= int(reply[1]):
            tasks.enqueue("finalize", batch_id)
        elif reply and not int(reply[3]) and int(reply[2]) <= size - step:
            try:
                window.refill(batch_id)  # room in the window, and lines held: push the next ones
            except Exception as exc:  # the reconciler's resync pushes them
                log.error("batch window not refilled", extra={"batch_id": batch_id, "error": repr(exc)})


def counts_from_rows(batch: Any) -> dict[str, int]:
    """``request_counts`` from the lines' jobs (one aggregate over the batch's index)."""
    ended = Q(state__in=[JobState.FAILED, JobState.CANCELED, JobState.EXPIRED])
    agg = batch.jobs.aggregate(
        completed=Count("pk", filter=Q(state=JobState.SUCCEEDED)), failed=Count("pk", filter=ended)
    )
    return {"total": batch.total, "completed": agg["completed"], "failed": agg["failed"]}


def counts(batch: Any) -> dict[str, int]:
    """The batch's ``request_counts`` now: the row's once final, else Redis's (the rows' if it has none)."""
    from batches.models import BatchStatus

    if batch.is_final or batch.status == BatchStatus.VALIDATING:
        return {"total": batch.total, "completed": batch.completed, "failed": batch.failed}
    try:
        raw = redis_client().hmget(counts_key(batch.pk), "completed", "failed")
    except RedisError:
        raw = [None, None]
    if raw[0] is None:
        return counts_from_rows(batch)
    completed, failed = int(raw[0]), int(raw[1] or 0)
    # a line an operator retried ends twice: never show more than there is
    completed = min(completed, batch.total)
    return {"total": batch.total, "completed": completed, "failed": min(failed, batch.total - completed)}
