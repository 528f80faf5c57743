"""Re-enqueue jobs the database says are waiting but Redis has forgotten.

The database is the system of record; Redis can lose a queue entry (FLUSHALL, a restart
without persistence, an enqueue that failed after the row committed). Any ``queued`` job
whose RQ job hash is gone is pushed again. Jobs younger than ``min_age_s`` are left alone:
their enqueue may still be in flight right after commit. A duplicate push is harmless
(the worker's compare-and-set makes the second delivery a no-op).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.utils import timezone

from jobs import queueing
from jobs.models import Job, JobState
from orchestrator_site.redis import redis_client

log = logging.getLogger(__name__)
BATCH = 500


def requeue_lost_jobs(min_age_s: float = 5.0) -> int:
    """Push every queued job whose RQ job is missing from Redis; returns how many were pushed."""
    client = redis_client()
    cutoff = timezone.now() - timedelta(seconds=min_age_s)
    queued = Job.objects.filter(state=JobState.QUEUED, created_at__lte=cutoff).order_by("created_at")
    pushed = 0
    last_created = None
    while True:
        page = queued if last_created is None else queued.filter(created_at__gt=last_created)
        batch = list(page.only("id", "priority", "queue", "rq_job_id", "timeout_s", "created_at")[:BATCH])
        if not batch:
            return pushed
        last_created = batch[-1].created_at
        pipe = client.pipeline(transaction=False)
        for job in batch:
            pipe.exists(queueing.get_queue(job.queue).job_class.key_for(job.rq_job_id))
        missing = [job for job, exists in zip(batch, pipe.execute(), strict=True) if not exists]
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
