"""Putting jobs on RQ queues. The RQ job carries only our job id (JSON, no pickle)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.conf import settings
from rq import Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now

from jobs import fair_queue
from orchestrator_site.redis import redis_client

if TYPE_CHECKING:
    from redis.client import Pipeline

    from jobs.models import Job

TASK = "workers.execution.job_run.run_job"
# Where the task lived before: RQ jobs enqueued then may still wait in Redis. Our workers run them as
# their own (they never import the task), so no module needs to stay at that path.
LEGACY_TASKS = ("workers.tasks.run_job",)
# RQ's own hard timeout sits above the job's deadline so our code, not RQ's
# death penalty, reports the timeout in the normal case.
RQ_TIMEOUT_GRACE_S = 30
_queues: dict[str, Queue] = {}


def get_queue(name: str) -> Queue:
    """Queues are built once per process: building one per request is a large share of a submission's cost."""
    queue = _queues.get(name)
    if queue is None:
        queue = _queues[name] = Queue(name, connection=redis_client(), serializer=JSONSerializer)
    return queue


def enqueue(job: Job, pipeline: Pipeline | None = None, meta: dict[str, str] | None = None) -> None:
    """Put ``job`` in its tenant's sub-queue of its queue (``jobs.fair_queue``); with ``pipeline``,
    nothing is sent until the caller executes it.

    The RQ job hash is RQ's own (a worker fetches it and RQ's tools can read it); only RQ's FIFO
    list is replaced by the fair queue. ``meta`` rides in the hash's meta, not its payload (the
    payload stays the bare job id): the W3C trace context (``traceparent``) when tracing is on, so
    the worker continues the trace.
    """
    queue = get_queue(job.queue)
    rq_job = queue.create_job(
        TASK,
        args=(str(job.pk),),
        job_id=job.rq_job_id,
        timeout=job.timeout_s + RQ_TIMEOUT_GRACE_S,
        result_ttl=settings.JOB_STATUS_CACHE_TTL_S,
        failure_ttl=7 * 24 * 3600,
        description=f"llm job {job.pk} ({job.priority})",
        meta=meta,
    )
    rq_job.origin = queue.name
    rq_job.enqueued_at = rq_now()
    pipe = pipeline if pipeline is not None else queue.connection.pipeline()
    rq_job.set_status(JobStatus.QUEUED, pipeline=pipe)
    rq_job.save(pipeline=pipe)
    tenant = job.tenant if type(job).tenant.is_cached(job) else None  # never a query here
    fair_queue.push(
        job.queue,
        fair_queue.tenant_key(job.tenant_id),
        rq_job.id,
        fair_queue.score_of((job.enqueued_at or job.created_at).timestamp()),
        weight=tenant.weight if tenant is not None else None,
        batch=job.batch_id is not None,  # a batch line: not counted toward max_queued / QUEUE_MAX_DEPTH
        pipeline=pipe,
    )
    if pipeline is None:
        pipe.execute()
