"""Cancelling a batch: ``cancelling`` at once (in the request), then, in a worker, its queued lines
are cancelled through the job state machine (``Job.cancel_queued``) a page at a time; running lines
finish as they would. When none is left active the finalizer writes the partial files and the
batch ends ``cancelled``.
"""

from __future__ import annotations

from django.db import transaction

from batches import progress, tasks
from batches.models import Batch, BatchStatus
from jobs.models import ACTIVE_STATES, Job, JobState

PAGE = 500


def request_cancel(batch: Batch) -> bool:
    """``validating|in_progress -> cancelling``; the worker's part is queued after commit."""
    with transaction.atomic():
        won = batch.transition(BatchStatus.CANCELLING)
        if won:
            batch_id = batch.pk
            transaction.on_commit(lambda: tasks.enqueue("cancel", batch_id))
    return won


def cancel_lines(batch_id: str) -> None:
    """The ``cancel`` task: cancel every queued line, then finalize once nothing is active."""
    batch = Batch.objects.filter(pk=batch_id).first()
    if batch is None or batch.status != BatchStatus.CANCELLING:
        return
    while True:
        page = list(batch.jobs.filter(state=JobState.QUEUED).order_by("pk")[:PAGE])
        if not page:
            break
        Job.cancel_queued(page)
    batch.refresh_from_db()  # creation has stopped: lines_created is final
    all_ended = progress.set_total(batch.pk, batch.lines_created)
    if all_ended or not batch.jobs.filter(state__in=ACTIVE_STATES).exists():
        tasks.enqueue("finalize", batch.pk)
