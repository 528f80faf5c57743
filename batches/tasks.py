"""The batch work that runs in workers, never in a web process: validating an input file and
creating its jobs (``start``), cancelling its queued lines (``cancel``) and writing its output and
error files (``finalize``).

Each is an RQ job pushed on the fair queue's ``high`` queue under a tenant key of its own
(``FAIR_KEY``), so a worker takes it ahead of the batch lines (``low`` by default) and beside
interactive traffic. Its RQ id is fixed per (task, batch): pushing the same task twice before a
worker takes it queues it once. Every task is idempotent, so a duplicate or a re-push by the
reconciler is harmless.
"""

from __future__ import annotations

import logging

from rq.job import JobStatus
from rq.utils import now as rq_now

from jobs import fair_queue, queueing

log = logging.getLogger(__name__)

QUEUE = "high"
FAIR_KEY = "-batches"  # the fair queue's tenant key for batch tasks
TASKS = {
    "start": "batches.creation.start",
    "cancel": "batches.cancelling.cancel_lines",
    "finalize": "batches.finalizing.finalize",
}
TIMEOUT_S = 3600  # RQ's hard limit for one task (a 50,000-line file takes well under a minute)


def enqueue(task: str, batch_id: str) -> None:
    """Push ``task`` for ``batch_id`` (after commit when called inside a transaction)."""
    queue = queueing.get_queue(QUEUE)
    rq_job = queue.create_job(
        TASKS[task],
        args=(batch_id,),
        job_id=f"batch-{task}-{batch_id}",
        timeout=TIMEOUT_S,
        result_ttl=0,
        failure_ttl=7 * 24 * 3600,
        description=f"batch {task} {batch_id}",
    )
    rq_job.origin = queue.name
    rq_job.enqueued_at = rq_now()
    pipe = queue.connection.pipeline()
    rq_job.set_status(JobStatus.QUEUED, pipeline=pipe)
    rq_job.save(pipeline=pipe)
    fair_queue.push(QUEUE, FAIR_KEY, rq_job.id, fair_queue.score_of(rq_job.enqueued_at.timestamp()), pipeline=pipe)
    pipe.execute()
