"""Putting jobs on RQ queues. The RQ job carries only our job id (JSON, no pickle)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.conf import settings
from rq import Queue
from rq.serializers import JSONSerializer

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
    """Push ``job`` onto its queue; with ``pipeline``, nothing is sent until the caller executes it.

    ``meta`` rides in the RQ job's meta hash, not its payload (the payload stays the bare job id):
    the W3C trace context (``traceparent``) when tracing is on, so the worker continues the trace.
    """
    get_queue(job.queue).enqueue_call(
        TASK,
        args=(str(job.pk),),
        job_id=job.rq_job_id,
        timeout=job.timeout_s + RQ_TIMEOUT_GRACE_S,
        result_ttl=settings.JOB_STATUS_CACHE_TTL_S,
        failure_ttl=7 * 24 * 3600,
        description=f"llm job {job.pk} ({job.priority})",
        pipeline=pipeline,
        meta=meta,
    )
