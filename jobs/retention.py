"""Retention: finished jobs older than a cutoff are deleted with everything that hangs off them.

A job goes with its attempts, its image links, the images no other job links to, and its
status document in Redis. Only terminal jobs (succeeded, failed, canceled) are candidates, and
each batch re-checks that under a row lock, so a job an operator re-queues meanwhile stays.

Deletion runs in batches of ``BATCH`` jobs, one short transaction each: no lock is held for
long and submissions (plain INSERTs of new rows) never wait for a purge. Used by
``manage.py purge_jobs`` and, with ``JOB_RETENTION_DAYS``, by the workers' reconciler pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, ProtectedError, Q, QuerySet
from django.utils import timezone
from redis.exceptions import RedisError

from jobs import status_mirror
from jobs.models import TERMINAL_STATES, Job, JobAttempt, JobImage, JobImageLink
from orchestrator_site.redis import key, redis_client

log = logging.getLogger(__name__)

BATCH = 1000
# The periodic pass: fleet-wide at most once per interval while it keeps up; it runs inside a
# worker's heartbeat thread, so each pass stops after a short time budget (a backlog then
# continues on the next reconcile pass instead of waiting a whole interval).
PERIODIC_LOCK = key("retention-lock")
PERIODIC_INTERVAL_S = 600
PERIODIC_BUDGET_S = 2.0


@dataclass
class PurgeCounts:
    """What a purge deleted (or, dry, would delete). ``complete``: nothing older is left."""

    jobs: int = 0
    attempts: int = 0
    images: int = 0
    mirror_entries: int = 0
    complete: bool = True

    def __str__(self) -> str:
        return (
            f"{self.jobs} job(s), {self.attempts} attempt(s), {self.images} image(s),"
            f" {self.mirror_entries} status mirror entr{'y' if self.mirror_entries == 1 else 'ies'}"
        )


def expired(older_than: timedelta, now: datetime | None = None) -> QuerySet[Job]:
    """Terminal jobs created, and finished, before ``now - older_than``."""
    cutoff = (now or timezone.now()) - older_than
    return Job.objects.filter(state__in=TERMINAL_STATES, created_at__lt=cutoff).filter(
        Q(finished_at__isnull=True) | Q(finished_at__lt=cutoff)
    )


def purge(
    older_than: timedelta,
    *,
    dry_run: bool = False,
    batch_size: int = BATCH,
    budget_s: float | None = None,
    pause_s: float = 0.0,
    now: datetime | None = None,
) -> PurgeCounts:
    """Delete (``dry_run``: count) the jobs ``expired(older_than)`` selects, ``batch_size`` per transaction.

    ``budget_s`` stops starting new batches after that many seconds (``complete`` is then False).
    ``pause_s`` sleeps between batches, leaving the database's disk and CPU to live traffic.
    """
    candidates = expired(older_than, now)
    if dry_run:
        return _count(candidates, batch_size)
    counts = PurgeCounts()
    started = time.monotonic()
    since: datetime | None = None
    while True:
        if budget_s is not None and time.monotonic() - started >= budget_s:
            counts.complete = False
            return counts
        # Oldest first, from where the last batch ended: the deleted prefix is never walked again.
        page = candidates if since is None else candidates.filter(created_at__gte=since)
        rows = list(page.order_by("created_at").values_list("pk", "created_at")[:batch_size])
        if not rows:
            return counts
        since = rows[-1][1]
        _delete_batch(candidates, [pk for pk, _ in rows], counts)
        if pause_s:
            time.sleep(pause_s)


def _delete_batch(candidates: QuerySet[Job], ids: list, counts: PurgeCounts) -> None:
    with transaction.atomic():
        # Lock the rows, re-checking they still qualify: an operator's retry of one waits for this
        # transaction, then finds it gone; one that won the race keeps its job.
        ids = list(candidates.filter(pk__in=ids).select_for_update().values_list("pk", flat=True))
        if not ids:
            return
        hashes = set(JobImageLink.objects.filter(job_id__in=ids).values_list("image_id", flat=True))
        _, deleted = Job.objects.filter(pk__in=ids).only("pk").delete()
    counts.jobs += deleted.get(Job._meta.label, 0)
    counts.attempts += deleted.get(JobAttempt._meta.label, 0)
    if hashes:
        counts.images += _delete_unreferenced_images(hashes)
    try:
        counts.mirror_entries += redis_client().delete(*(status_mirror.cache_key(pk) for pk in ids))
    except RedisError as exc:  # the entries expire on their own (JOB_STATUS_CACHE_TTL_S)
        log.warning("purge could not delete status mirror entries", extra={"jobs": len(ids), "error": str(exc)})


def _delete_unreferenced_images(hashes: set[str]) -> int:
    try:
        with transaction.atomic():
            return JobImage.delete_unreferenced(hashes)
    except (IntegrityError, ProtectedError):
        # A submission linked one of them meanwhile: it stays; an unreferenced one goes next time.
        log.info("purge left images a new job links to", extra={"images": len(hashes)})
        return 0


def _count(candidates: QuerySet[Job], batch_size: int) -> PurgeCounts:
    links = JobImageLink.objects.filter(image_id=OuterRef("pk"))
    freed = JobImage.objects.filter(Exists(links.filter(job__in=candidates))).exclude(
        Exists(links.exclude(job__in=candidates))
    )
    counts = PurgeCounts(
        jobs=candidates.count(),
        attempts=JobAttempt.objects.filter(job__in=candidates).count(),
        images=freed.count(),
    )
    ids = candidates.order_by().values_list("pk", flat=True).iterator(chunk_size=batch_size)
    try:
        client = redis_client()
        while chunk := [status_mirror.cache_key(pk) for _, pk in zip(range(batch_size), ids, strict=False)]:
            counts.mirror_entries += client.exists(*chunk)
    except RedisError as exc:
        log.warning("purge could not count status mirror entries", extra={"error": str(exc)})
    return counts


def purge_if_due() -> PurgeCounts | None:
    """The periodic pass: purge by ``JOB_RETENTION_DAYS`` (0: keep everything) if no process did lately.

    Returns None when retention is off or another pass holds the fleet-wide lock.
    """
    days = settings.JOB_RETENTION_DAYS
    if not days:
        return None
    client = redis_client()
    if not client.set(PERIODIC_LOCK, "1", nx=True, ex=PERIODIC_INTERVAL_S):
        return None
    counts = purge(timedelta(days=days), budget_s=PERIODIC_BUDGET_S)
    if not counts.complete:
        client.delete(PERIODIC_LOCK)  # a backlog: the next reconcile pass goes on with it
    if counts.jobs:
        log.info("purged expired jobs", extra={"jobs": counts.jobs, "images": counts.images, "days": days})
    return counts
