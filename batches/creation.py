"""A batch's start, in a worker: validate the input file, then create one job per line in bulk.

Two streaming passes over the file, line by line from storage (memory stays flat in the file's
size). The first checks every line (``batches.jsonl``) and the tenant's counted limits; any problem
fails the whole batch with the line numbers (``errors.data``), and no job exists. The batch then
goes ``in_progress`` and the second pass creates the jobs ``BATCH_CHUNK`` at a time: one
``bulk_create`` per chunk in a short transaction (which also counts ``lines_created`` on the batch
row, only while it is ``in_progress``: a cancel stops the creation at the next chunk). The lines are
created *held* (no ``enqueued_at``); after the commit, as many as the batch's window has room for
are pushed on the fair queue at the batch's priority in one Redis pipeline, and the rest follow as
earlier lines end (``batches.window``). A task that died part-way is started again by the
reconciler and skips the lines whose job exists.

Tenant limits for batch lines (docs/batches.md): ``max_priority`` and ``allowed_backends`` apply
as to any request; ``rpm_limit`` does not (a batch is one request, not 50,000); ``tokens_per_day``
and ``budget_usd`` are checked once for the whole file (over either, the batch fails with
``token_limit_exceeded`` / ``budget_exceeded``) and every line reserves its tokens as a job does;
``max_queued`` and ``QUEUE_MAX_DEPTH`` neither refuse lines nor count them: they wait, held or in
the window, behind interactive traffic at higher priorities and in the tenant's fair share at their own.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from redis.exceptions import RedisError

from batches import jsonl, progress, window
from batches.models import Batch, BatchStatus, File, files_storage
from jobs import services
from jobs.models import Job, JobState
from orchestrator_site.redis import redis_client
from routing import registry
from routing.services import RoutingError, route
from tenants import admission

log = logging.getLogger(__name__)

TOUCH_EVERY = 2000  # lines between two "still alive" writes during validation (the reconciler's staleness)
CHUNK_BYTES = 16 * 1024 * 1024  # a chunk is also cut at this many bytes of lines (lines with images are big)


class Refused(Exception):
    """The whole file is refused: ``errors`` in OpenAI's BatchError shape."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(errors[0]["message"] if errors else "refused")
        self.errors = errors


class Stopped(Exception):
    """The batch left ``in_progress`` (a cancel) while its jobs were being created."""


def _snapshot() -> registry.Snapshot:
    return registry.snapshot(registry.ensure_token(redis_client().get(registry.VERSION_KEY)))


def max_line_bytes() -> int:
    return int(settings.DATA_UPLOAD_MAX_MEMORY_SIZE)


def start(batch_id: str) -> None:
    """The ``start`` task: validate (``validating``), then create the lines' jobs (``in_progress``)."""
    batch = Batch.objects.select_related("tenant", "created_by").filter(pk=batch_id).first()
    if batch is None:
        return
    if batch.status == BatchStatus.VALIDATING:
        try:
            total, tokens = validate(batch)
            check_limits(batch, tokens)
        except Refused as exc:
            batch.transition(BatchStatus.FAILED, errors=exc.errors)
            return
        ttl_s = int((batch.expires_at - timezone.now()).total_seconds()) + 7 * 24 * 3600
        progress.start(batch.pk, total, max(ttl_s, 3600))
        if not batch.transition(BatchStatus.IN_PROGRESS, total=total):
            return  # cancelled while validating: the cancel task finishes it
    if batch.status == BatchStatus.IN_PROGRESS and batch.lines_created < batch.total:
        try:
            create_jobs(batch)
        except Stopped:
            log.info("batch creation stopped", extra={"batch_id": batch.pk})


def validate(batch: Batch) -> tuple[int, int]:
    """Check every line of the input file; (lines, tokens they reserve), or ``Refused``."""
    snap, tenant, limits = _snapshot(), batch.tenant, settings.JOB_LIMITS
    seen: set[str] = set()
    errors: list[dict[str, Any]] = []
    more = total = tokens = 0
    cap, max_errors, max_bytes = settings.BATCH_MAX_REQUESTS, settings.BATCH_ERRORS_MAX, max_line_bytes()
    try:
        stream = files_storage().open(batch.input_file.blob, "rb")
    except (File.DoesNotExist, OSError) as exc:
        raise Refused([{"code": "file_not_found", "line": None, "message": f"The input file is gone: {exc}"}]) from None
    with stream:
        for number, raw in jsonl.read_lines(stream, max_bytes):
            total += 1
            if total > cap:
                message = f"The file has more than {cap} requests; a batch takes at most {cap}."
                raise Refused([{"code": "too_many_requests", "line": number, "message": message}])
            checked = jsonl.check_line(
                number, raw, snap=snap, tenant=tenant, limits=limits, seen=seen, max_bytes=max_bytes
            )
            if isinstance(checked, jsonl.LineError):
                if len(errors) < max_errors:
                    errors.append(checked.as_openai())
                else:
                    more += 1
            else:
                tokens += admission.reservation(checked.job)
            if total % TOUCH_EVERY == 0:
                Batch.objects.filter(pk=batch.pk).update(updated_at=timezone.now())
    if errors:
        if more:
            errors.append({"code": "too_many_errors", "line": None, "message": f"{more} more lines have errors."})
        raise Refused(errors)
    if not total:
        raise Refused([{"code": "empty_file", "line": None, "message": "The input file has no requests."}])
    return total, tokens


def check_limits(batch: Batch, tokens: int) -> None:
    """The tenant's day of tokens and its budget, for the whole file at once (``Refused`` when over)."""
    tenant = batch.tenant
    if tenant is None:
        return
    now = timezone.now()
    client = redis_client()
    if tenant.tokens_per_day is not None:
        key = admission.tokens_key(tenant.pk, now)
        if not client.exists(key):
            admission.rebuild_tokens(tenant.pk, now)
        used = int(client.get(key) or 0)
        if used + tokens > tenant.tokens_per_day:
            message = (
                f"The batch's requests reserve {tokens} tokens; tenant {tenant.name!r} has"
                f" {max(tenant.tokens_per_day - used, 0)} of its tokens_per_day left today."
            )
            raise Refused([{"code": "token_limit_exceeded", "line": None, "message": message}])
    if tenant.budget_usd is not None:
        key = admission.spend_key(tenant.pk, tenant.budget_period, now)
        if not client.exists(key):
            admission.rebuild_spend(tenant.pk, tenant.budget_period, now)
        if int(client.get(key) or 0) >= admission.micro_usd(tenant.budget_usd):
            message = f"Tenant {tenant.name!r} has spent its budget_usd for this {tenant.budget_period}."
            raise Refused([{"code": "budget_exceeded", "line": None, "message": message}])


def create_jobs(batch: Batch) -> None:
    """The second pass: one queued job per line, ``BATCH_CHUNK`` at a time; resumes after a crash."""
    snap, tenant, limits = _snapshot(), batch.tenant, settings.JOB_LIMITS
    existing = set(batch.jobs.values_list("custom_id", flat=True)) if batch.lines_created else set()
    seen: set[str] = set()
    chunk: list[jsonl.Line | jsonl.LineError] = []
    size = 0
    with files_storage().open(batch.input_file.blob, "rb") as stream:
        for number, raw in jsonl.read_lines(stream, max_line_bytes()):
            checked = jsonl.check_line(
                number, raw, snap=snap, tenant=tenant, limits=limits, seen=seen, max_bytes=max_line_bytes()
            )
            if isinstance(checked, jsonl.Line) and checked.custom_id in existing:
                continue
            chunk.append(checked)
            size += len(raw or b"")
            if len(chunk) >= settings.BATCH_CHUNK or size >= CHUNK_BYTES:
                _create_chunk(batch, chunk, snap)
                chunk, size = [], 0
    if chunk:
        _create_chunk(batch, chunk, snap)


def _create_chunk(batch: Batch, lines: list[jsonl.Line | jsonl.LineError], snap: registry.Snapshot) -> None:
    """Insert one chunk's jobs and count them on the batch (one transaction), then push them (one pipeline).

    A line the registry no longer serves (its model or backend went away since validation) becomes
    a job that has already failed, with the reason: it is in the error file like any failed line.
    """
    tenant, user = batch.tenant, batch.created_by
    now = timezone.now()
    window_s = max(1, int((batch.expires_at - batch.created_at).total_seconds()))
    allowed = tenant.allowed_backends if tenant is not None else ()
    jobs: list[Job] = []
    with_images: list[tuple[Job, list[str]]] = []
    failed = 0
    for line in lines:
        if isinstance(line, jsonl.LineError):
            jobs.append(_failed_line(batch, line.custom_id, line.message, now))
            failed += 1
            continue
        data = {**line.job, "priority": batch.priority}
        job_id = uuid.uuid4()
        try:
            decision = route(services.job_facts(data, key=str(job_id), allowed_backends=allowed), snap)
        except RoutingError as exc:
            jobs.append(_failed_line(batch, line.custom_id, str(exc), now))
            failed += 1
            continue
        job = services.build(
            data, user=user, decision=decision, backend=snap.backends[decision.backend], tenant=tenant, job_id=job_id
        )
        job.batch_id, job.custom_id = batch.pk, line.custom_id
        job.enqueued_at = None  # held until the window pushes it
        job.queue_timeout_s, job.expires_at = window_s, batch.expires_at
        if tenant is not None and tenant.tokens_per_day is not None:
            job.reserved_tokens = admission.reservation(data)
        jobs.append(job)
        if line.images:
            job.image_count = len(line.images)
            with_images.append((job, line.images))
    queued = [job for job in jobs if job.state == JobState.QUEUED]
    with transaction.atomic():
        Job.objects.bulk_create(jobs)
        for job, images in with_images:
            job.attach_images(images)
        moved = Batch.objects.filter(pk=batch.pk, status=BatchStatus.IN_PROGRESS).update(
            lines_created=F("lines_created") + len(jobs), updated_at=now
        )
        if not moved:
            raise Stopped  # rolls the chunk back: a cancel won, and no line of it exists
        transaction.on_commit(lambda: _push(batch, queued, failed))
    batch.lines_created += len(jobs)


def _failed_line(batch: Batch, custom_id: str, reason: str, now) -> Job:
    return Job(
        state=JobState.FAILED,
        priority=batch.priority,
        timeout_s=settings.JOB_LIMITS["timeout_s"],
        created_by=batch.created_by,
        tenant=batch.tenant,
        tenant_name=batch.tenant.name if batch.tenant is not None else "",
        batch_id=batch.pk,
        custom_id=custom_id,
        error=reason,
        created_at=now,
        finished_at=now,
    )


def _push(batch: Batch, queued: list[Job], failed: int) -> None:
    reserved = sum(job.reserved_tokens or 0 for job in queued)
    if reserved and batch.tenant is not None:
        # as admission reserves one job's: only a counter that exists (a missing one is rebuilt from the rows)
        try:
            redis_client().eval(admission.ADJUST, 0, admission.tokens_key(batch.tenant.pk, timezone.now()), reserved)
        except RedisError as exc:  # the counter is rebuilt from the rows when it is next missed
            log.warning("batch tokens not reserved", extra={"batch_id": batch.pk, "error": str(exc)})
    window.refill(batch.pk)  # the rows are held: what the window has no room for waits for earlier lines
    if failed:
        progress.add(batch.pk, 0, failed)


def stale_after() -> timedelta:
    """How long an open batch may go without a write before the reconciler starts its task again."""
    return timedelta(seconds=120)
