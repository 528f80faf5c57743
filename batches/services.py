"""Files and batches for the API: storing an upload, creating a batch, and who sees what.

The web process only streams an upload into storage and writes rows; the work on a file's
lines runs in a worker (``batches.tasks``), so a request's memory and time do not grow with the file.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from batches import tasks
from batches.models import Batch, BatchStatus, File, FilePurpose, files_storage
from openai_api.translate import PRIORITIES, InvalidRequest
from tenants.admission import TenantForbidden
from tenants.models import Tenant

ENDPOINTS = ("/v1/chat/completions",)
WINDOWS = ("24h",)
METADATA_MAX = 16  # OpenAI: up to 16 pairs, keys up to 64 characters, values up to 512


def visible(model: type[File] | type[Batch], user: Any, tenant: Tenant | None) -> QuerySet:
    """What the caller may see: staff everything, a tenant's key or member its tenant's, a user its own."""
    qs = model.objects.all()
    if user.is_staff:
        return qs
    if tenant is not None:
        return qs.filter(Q(tenant=tenant) | Q(created_by=user))
    return qs.filter(created_by=user)


def create_file(upload: UploadedFile, purpose: Any, *, user: Any, tenant: Tenant | None) -> File:
    """Store an uploaded batch input file (the upload is already on disk or in memory: copied in chunks)."""
    if purpose != FilePurpose.BATCH:
        raise InvalidRequest(
            f"'purpose' must be 'batch': this server keeps files for the Batch API only (got {purpose!r}).",
            "purpose",
        )
    if not upload.size:
        raise InvalidRequest("The file is empty.", "file")
    file = File(purpose=FilePurpose.BATCH, filename=(upload.name or "upload.jsonl")[:255], bytes=upload.size)
    file.created_by = user
    file.tenant = tenant
    file.blob = files_storage().save(f"{file.id}.jsonl", upload)
    try:
        file.save(force_insert=True)
    except BaseException:
        files_storage().delete(file.blob)
        raise
    return file


def create_batch(data: Any, *, user: Any, tenant: Tenant | None) -> Batch:
    """Check a ``POST /v1/batches`` body and create the batch (``validating``); its start is queued."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unknown = sorted(set(data) - {"input_file_id", "endpoint", "completion_window", "metadata", "priority"})
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    if data.get("endpoint") not in ENDPOINTS:
        raise InvalidRequest(f"'endpoint' must be one of: {', '.join(ENDPOINTS)}.", "endpoint")
    if data.get("completion_window") not in WINDOWS:
        raise InvalidRequest("'completion_window' must be '24h'.", "completion_window")
    metadata = data.get("metadata") or {}
    if (
        not isinstance(metadata, dict)
        or len(metadata) > METADATA_MAX
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()
        )
    ):
        raise InvalidRequest("'metadata' is up to 16 string pairs (keys ≤ 64, values ≤ 512 characters).", "metadata")
    priority = data.get("priority") or settings.BATCH_DEFAULT_PRIORITY
    if priority not in PRIORITIES:
        raise InvalidRequest(f"'priority' must be one of: {', '.join(PRIORITIES)}.", "priority")
    if tenant is not None:
        if not tenant.enabled:
            raise TenantForbidden(f"Tenant {tenant.name!r} is disabled.", "enabled")
        if not tenant.allows_priority(priority):
            raise TenantForbidden(
                f"Priority {priority!r} is above tenant {tenant.name!r}'s max_priority {tenant.max_priority!r}.",
                "max_priority",
            )
    file_id = data.get("input_file_id")
    file = visible(File, user, tenant).filter(pk=file_id).first() if isinstance(file_id, str) else None
    if file is None:
        raise InvalidRequest(f"No such file: {file_id!r}.", "input_file_id", code="file_not_found")
    if file.purpose != FilePurpose.BATCH:
        raise InvalidRequest(f"File {file.pk} has purpose {file.purpose!r}, not 'batch'.", "input_file_id")
    now = timezone.now()
    batch = Batch(
        input_file=file,
        endpoint=data["endpoint"],
        completion_window=data["completion_window"],
        metadata=metadata,
        priority=priority,
        created_by=user,
        tenant=tenant,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.BATCH_COMPLETION_WINDOW_S),
    )
    with transaction.atomic():
        batch.save(force_insert=True)
        batch_id = batch.pk
        # The row is the batch: once committed it is answered, even if Redis is down for the push (logged;
        # the reconciler starts a batch left validating, batches.recovery). A 503 would make the caller
        # create it again.
        transaction.on_commit(lambda: tasks.enqueue("start", batch_id), robust=True)
    return batch


def in_use(file: File) -> Batch | None:
    """A batch that still reads ``file`` (its input, while it is validated or its jobs created)."""
    return Batch.objects.filter(input_file=file, status__in=[BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS]).first()
