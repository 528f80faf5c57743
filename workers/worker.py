"""The worker class behind ``manage.py rqworker`` (set in ``settings.RQ['WORKER_CLASS']``)."""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime
from typing import Any

from django.utils import timezone
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from orchestrator_site import metrics, tracing

log = logging.getLogger(__name__)


class OrchestratorWorker(SimpleWorker):
    """Runs jobs in the worker process itself, with the JSON serializer.

    No fork per job: forking costs most of RQ's per-job time (~69 vs ~267 no-op jobs/s
    on our machines), drops the process's warm DB and Redis connections, and breaks
    CUDA. ``rqworker`` passes its own ``--serializer`` default (pickle); we always use
    JSON because our RQ jobs carry only a job id and pickle is never needed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["serializer"] = JSONSerializer
        # host.pid instead of RQ's random hex, so a job's `worker` says where it ran.
        # RQ's Worker.all()/find_by_key() pass the stored name positionally (second argument).
        if len(args) < 2:
            kwargs["name"] = kwargs.get("name") or f"{socket.gethostname()}.{os.getpid()}"
        super().__init__(*args, **kwargs)

    def work(self, *args: Any, **kwargs: Any) -> bool:
        """Beat a liveness key while working, so the jobs of a killed worker are recovered in seconds."""
        from workers.heartbeat import Heartbeat

        beat = Heartbeat(self.name)
        beat.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            beat.stop()

    # --- observability hook (issue 7): trace context in, fleet metrics out -------------------
    def perform_job(self, job: RQJob, queue: Queue, execution: Execution) -> bool:
        """Run the job inside a span continuing the request's trace, then record what it did.

        Metrics and attempt spans are read back from the Job/JobAttempt rows (two PK-indexed
        reads) instead of being reported by the task, so they stay right whatever the task does.
        A failure here is logged and never changes the job's outcome.
        """
        job_id = str(job.args[0]) if job.args else job.id
        since = timezone.now()
        with tracing.job_span(job.meta, job_id=job_id, queue=queue.name, worker=self.name) as span:
            ok = super().perform_job(job, queue, execution)
            record_run(job_id, queue.name, since, span)
        return ok


def record_run(job_id: str, queue: str, since: datetime, span: Any = None) -> None:
    """Fleet metrics (and attempt spans under ``span``) for what one execution of ``job_id`` did.

    For worker classes that run jobs outside ``perform_job`` (the GPU batcher): call it once per
    job after its outcome is written, with ``since`` taken before the job was claimed.
    """
    try:
        run = metrics.read_run(job_id, queue, since)
        if run is not None:
            metrics.record_run(run)
            tracing.add_attempt_spans(span, run)
    except Exception as exc:  # observability must not fail a job
        log.warning("job metrics not recorded", extra={"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"})
