"""Where a waiting job stands: its place among the jobs the workers would take, and an ETA.

Both are read when asked (``GET /jobs/<id>``, the job's admin page), never stored: one Redis round
trip (the fair queue's position script and the pool's drain counters, pipelined). The position is
that of ``jobs.fair_queue.position``: a forecast as the queue stands (moved back by new jobs at a
higher priority or of a tenant that starts waiting, blind to aging), exact up to
``POSITION_SCAN_MAX`` tenants ahead and estimated past them, so its cost stays bounded. The ETA divides it by the
pool's measured drain rate (jobs taken per second over the last minute, every priority of the pool);
with nothing taken in that minute there is no rate and no ETA.

A batch line held back by its batch's window (``queued`` in the database, on no queue yet: see
docs/batches.md) gets the place it will have: behind its tenant's jobs waiting now and the lines of
its batch held before it (its batch pushes them in ``custom_id`` order), as the fair queue would
serve that many; one count over the held lines' partial index, then the same script.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from redis.exceptions import RedisError

from jobs import fair_queue
from jobs.models import Job, JobState
from orchestrator_site.redis import redis_client


@dataclass(frozen=True)
class Place:
    position: int | None
    eta_s: float | None


UNKNOWN = Place(None, None)


def pool_queues(queue: str) -> tuple[list[str], list[str]]:
    """(the queues of ``queue``'s pool before it, every queue of its pool), in the workers' order."""
    priorities = list(settings.JOB_QUEUES)
    for i, priority in enumerate(priorities):
        if queue == priority or queue.endswith("-" + priority):
            pool = queue[: len(queue) - len(priority)]
            names = [pool + p for p in priorities]
            return names[:i], names
    return [], [queue]


def place(queue: str, tenant_id: int | None, rq_job_id: str, *, after: int = 0) -> Place:
    """The job's place at ``queue``; ``UNKNOWN`` when it waits nowhere or Redis does not answer.
    ``rq_job_id`` ``''``: the place of a job not queued yet, ``after`` jobs behind its tenant's last."""
    higher, pool = pool_queues(queue)
    pipe = redis_client().pipeline(transaction=False)
    fair_queue.position(queue, fair_queue.tenant_key(tenant_id), rq_job_id, higher, after=after, pipeline=pipe)
    pipe.mget([k for q in pool for k in fair_queue.drain_keys(q)])
    try:
        raw_position, drained = pipe.execute()
    except RedisError:
        return UNKNOWN
    position = int(raw_position) if int(raw_position) > 0 else None
    rate = fair_queue.drain_rate_of(drained)
    eta = round(position / rate, 1) if position is not None and rate > 0 else None
    return Place(position, eta)


def held_place(job_id: str) -> Place:
    """The place a batch line held back by its batch's window will have; ``UNKNOWN`` for any other job."""
    row = (
        Job.objects.filter(pk=job_id, state=JobState.QUEUED, enqueued_at__isnull=True, batch__isnull=False)
        .values("batch_id", "custom_id", "queue", "tenant_id")
        .first()
    )
    if row is None:
        return UNKNOWN
    ahead = Job.objects.filter(
        batch_id=row["batch_id"], state=JobState.QUEUED, enqueued_at__isnull=True, custom_id__lt=row["custom_id"]
    ).count()
    return place(row["queue"], row["tenant_id"], "", after=ahead)
