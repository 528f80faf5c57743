"""Re-enqueue jobs the database says are waiting but Redis has forgotten, and jobs lost with a worker.

The database is the system of record; Redis can lose a queue entry (FLUSHALL, a restart
without persistence, an enqueue that failed after the row committed, a worker stopped between
popping a job and claiming it). Any ``queued`` job whose RQ job is gone, or that waits in no
sub-queue of the fair queue (``jobs.fair_queue``), is pushed again, except a batch line its batch's
window holds back (no ``enqueued_at``: ``batches.window`` pushes it). Jobs younger than ``min_age_s``
are left alone: their enqueue may still be in flight right after commit. A duplicate push is
harmless (the worker's compare-and-set makes the second delivery a no-op).

A ``running`` job is re-queued when its worker's liveness key expired: the worker has not beaten
for a whole lease TTL (its long-lived ``worker-seen`` key is still there). When both keys are gone
(Redis restarted or was flushed), a worker only counts as dead once its key has stayed missing for
two heartbeats, measured from when a pass first saw it missing (``llmo:worker-missing:<name>``): a
live worker writes its key back within one beat, so a restart never steals a job from a worker
that is still running it.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from batches.recovery import reconcile_batches
from jobs import fair_queue, queueing, retention
from jobs.models import Job, JobState
from orchestrator_site.redis import key, redis_client
from workers.execution.run_figures import record_expired
from workers.fleet import liveness

log = logging.getLogger(__name__)
BATCH = 500


def requeue_lost_jobs(min_age_s: float = 5.0) -> int:
    """Push every queued job whose RQ job is missing from Redis, or that waits on no queue; returns how many."""
    client = redis_client()
    cutoff = timezone.now() - timedelta(seconds=min_age_s)
    queued = (
        Job.objects.filter(state=JobState.QUEUED, created_at__lte=cutoff)
        .exclude(batch__isnull=False, enqueued_at__isnull=True)  # held by its batch's window, not lost
        .order_by("created_at")
    )
    pushed = 0
    last_created = None
    while True:
        page = queued if last_created is None else queued.filter(created_at__gt=last_created)
        fields = (
            "id",
            "priority",
            "queue",
            "rq_job_id",
            "timeout_s",
            "created_at",
            "enqueued_at",
            "tenant_id",
            "batch_id",
        )
        batch = list(page.only(*fields)[:BATCH])
        if not batch:
            return pushed
        last_created = batch[-1].created_at
        pipe = client.pipeline(transaction=False)
        for job in batch:
            pipe.exists(queueing.get_queue(job.queue).job_class.key_for(job.rq_job_id))
            fair_queue.is_waiting(job.queue, fair_queue.tenant_key(job.tenant_id), job.rq_job_id, pipeline=pipe)
        replies = pipe.execute()
        missing = [
            job
            for job, found, waiting in zip(batch, replies[::2], replies[1::2], strict=True)
            if not found or waiting is None
        ]
        if missing:
            pipe = client.pipeline()
            for job in missing:
                queueing.enqueue(job, pipeline=pipe)
            pipe.execute()
            Job.objects.filter(pk__in=[j.pk for j in missing], enqueued_at__isnull=True).update(
                enqueued_at=timezone.now()
            )
            pushed += len(missing)
            log.warning("re-enqueued jobs lost by Redis", extra={"count": len(missing)})


def expire_overdue() -> int:
    """Queued jobs past their queue timeout end ``expired``, found here even when no worker runs."""
    expired = 0
    while batch := Job.expire_due():
        record_expired(batch)
        expired += len(batch)
    if expired:
        log.info("expired jobs past their queue timeout", extra={"count": expired})
    return expired


def missing_key(worker_name: str) -> str:
    return key("worker-missing", worker_name)


def dead_workers(names: list[str]) -> set[str]:
    """Workers whose liveness key expired, or has been missing for two heartbeats (see the module doc)."""
    client = redis_client()
    alive = liveness.alive(names)
    missing = [name for name in names if not alive.get(name)]
    seen = dict(zip(missing, client.mget([liveness.seen_key(n) for n in missing]), strict=True)) if missing else {}
    grace_s = max(2 * float(settings.WORKER_HEARTBEAT_S), 1.0)
    secs, micros = client.time()
    now = secs + micros / 1e6
    dead = set()
    for name in names:
        if alive.get(name):
            client.delete(missing_key(name))  # back (or never gone): the next absence starts a new grace
            continue
        if seen.get(name):
            dead.add(name)  # its key expired: no beat for a whole lease TTL
            continue
        client.set(missing_key(name), f"{now:.6f}", nx=True, ex=24 * 3600)
        since = float(client.get(missing_key(name)) or now)
        if now - since >= grace_s:
            dead.add(name)
    return dead


def requeue_orphaned_running() -> tuple[int, int]:
    """Running jobs whose worker stopped beating: re-queue them, or fail them after MAX_DELIVERIES.

    Returns (re-queued, failed). A worker that is alive keeps its key however slow its job is, so
    nothing is stolen from it; the CAS in ``requeue_lost`` makes a late finish by a revived worker
    and this pass exclusive.
    """
    cutoff = timezone.now() - timedelta(seconds=settings.WORKER_LEASE_TTL_S)
    running = list(
        Job.objects.filter(state=JobState.RUNNING, started_at__lte=cutoff).only(
            "id", "priority", "queue", "rq_job_id", "timeout_s", "worker", "attempt_count", "version", "batch_id"
        )
    )
    if not running:
        return 0, 0
    dead = dead_workers(sorted({job.worker for job in running if job.worker}))
    requeued = failed = 0
    for job in running:
        if job.worker and job.worker not in dead:
            continue
        job.refresh_from_db()
        reason = f"worker {job.worker or '?'} was lost while running this job (no heartbeat)"
        if job.attempt_count >= settings.MAX_DELIVERIES:
            if job.mark_failed(f"{reason}; gave up after {job.attempt_count} deliveries"):
                failed += 1
            continue
        if job.requeue_lost(reason):
            queueing.enqueue(job)
            requeued += 1
    if requeued or failed:
        log.warning("recovered jobs lost with their worker", extra={"requeued": requeued, "failed": failed})
    return requeued, failed


def reconcile(min_age_s: float = 5.0) -> tuple[int, int, int]:
    """One pass: (queued jobs re-enqueued, running jobs re-queued, running jobs failed); jobs past
    their queue timeout are expired first, so none of them is pushed again."""
    expire_overdue()
    pushed = requeue_lost_jobs(min_age_s=min_age_s)
    requeued, failed = requeue_orphaned_running()
    reconcile_batches()  # a batch whose task died or whose last count was lost moves on
    retention.purge_if_due()  # throttled fleet-wide by its own lock
    return pushed, requeued, failed
