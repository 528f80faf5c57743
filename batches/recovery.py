"""The reconciler's part for batches: a batch whose task died, or whose last count was lost, moves on.

Every batch task is idempotent, so this only pushes the task an open batch needs when nothing has
written the batch for ``STALE_S``: ``start`` again for one stuck ``validating`` or half-created
(it skips the lines that exist), ``cancel`` for one stuck ``cancelling``, and ``finalize`` for one
stuck ``finalizing`` or whose lines have all ended without the finalizer being queued (a count
lost with Redis). For one whose lines still run it recounts the window from the rows (rebuilding a
hash lost with Redis) and pushes the held lines it has room for (``batches.window.refill``): a
count lost or a failed push delays a batch's held lines, never strands them.
"""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from batches import progress, tasks, window
from batches.models import Batch, BatchStatus
from jobs.models import ACTIVE_STATES

STALE_S = 120  # well above the creation's write interval (a chunk, or TOUCH_EVERY validated lines)


def reconcile_batches(stale_s: float = STALE_S) -> int:
    """One pass; returns how many tasks were pushed (and windows that pushed held lines)."""
    cutoff = timezone.now() - timedelta(seconds=stale_s)
    pushed = 0
    stale = Batch.objects.filter(updated_at__lte=cutoff)
    for batch in stale.filter(status__in=[BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS]).only(
        "id", "status", "total", "lines_created", "expires_at"
    ):
        if batch.status == BatchStatus.VALIDATING or batch.lines_created < batch.total:
            tasks.enqueue("start", batch.pk)
        elif not batch.jobs.filter(state__in=ACTIVE_STATES).exists():
            tasks.enqueue("finalize", batch.pk)
        else:
            ttl_s = int((batch.expires_at - timezone.now()).total_seconds()) + 7 * 24 * 3600
            progress.rebuild(batch, max(ttl_s, 3600))
            if not window.refill(batch.pk, resync=True):
                continue
        pushed += 1
    for batch_id in stale.filter(status=BatchStatus.CANCELLING).values_list("id", flat=True):
        tasks.enqueue("cancel", batch_id)
        pushed += 1
    for batch_id in stale.filter(status=BatchStatus.FINALIZING).values_list("id", flat=True):
        tasks.enqueue("finalize", batch_id)
        pushed += 1
    return pushed
