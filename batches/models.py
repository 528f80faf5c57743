"""Files and batches in OpenAI's shapes: the rows, and the batch's state machine.

A batch's lines are ``jobs.Job`` rows (``Job.batch``, ``Job.custom_id``): they run as any job does.
Every status change goes through ``Batch.transition``, a compare-and-set ``UPDATE ... WHERE status
IN (allowed)`` (as ``jobs.models.TRANSITIONS``): a cancel racing the finalizer, or two finalizers,
have exactly one winner, and ``batches.hooks.ended`` runs once per final status.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.files.storage import Storage, storages
from django.db import models, transaction
from django.utils import timezone

from batches import hooks


def files_storage() -> Storage:
    """Where file contents live (``STORAGES['files']``; never a public URL: downloads go through the API)."""
    return storages["files"]


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


class FilePurpose(models.TextChoices):
    BATCH = "batch"  # an input file, uploaded
    BATCH_OUTPUT = "batch_output"  # a batch's output or error file, written by the finalizer


class File(models.Model):
    """An uploaded or generated file; its bytes are in ``files_storage()`` under ``blob``."""

    id = models.CharField(primary_key=True, max_length=40, default=new_file_id, editable=False)
    purpose = models.CharField(max_length=16, choices=FilePurpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.PositiveBigIntegerField(default=0)
    blob = models.CharField(max_length=400, help_text="The storage name of the contents.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    tenant = models.ForeignKey("tenants.Tenant", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.filename})"

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's ``FileObject``."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": _unix(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


class BatchStatus(models.TextChoices):
    VALIDATING = "validating"
    FAILED = "failed"  # the input file was refused (see errors); no line ran
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"  # the completion window passed: unfinished lines expired, the rest are in the files
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset({BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})
# Statuses whose lines may still be created or running: the finalizer's, the reconciler's and cancel's concern.
OPEN_STATUSES = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING})

# target status -> statuses it may be entered from. The one table of legal moves.
TRANSITIONS: dict[str, frozenset[str]] = {
    BatchStatus.IN_PROGRESS: frozenset({BatchStatus.VALIDATING}),
    BatchStatus.FAILED: frozenset({BatchStatus.VALIDATING}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS}),
    BatchStatus.FINALIZING: frozenset({BatchStatus.IN_PROGRESS}),
    BatchStatus.COMPLETED: frozenset({BatchStatus.FINALIZING}),
    BatchStatus.EXPIRED: frozenset({BatchStatus.FINALIZING}),
    BatchStatus.CANCELLED: frozenset({BatchStatus.CANCELLING}),
}


class Batch(models.Model):
    """An OpenAI batch: one input file of requests, one job per line, output and error files at the end."""

    id = models.CharField(primary_key=True, max_length=40, default=new_batch_id, editable=False)
    status = models.CharField(max_length=16, choices=BatchStatus.choices, default=BatchStatus.VALIDATING)
    endpoint = models.CharField(max_length=64, default="/v1/chat/completions")
    completion_window = models.CharField(max_length=8, default="24h")
    priority = models.CharField(max_length=8, default="low")
    metadata = models.JSONField(default=dict, blank=True)
    # The files are kept by id without a database constraint: OpenAI's batch keeps naming a file
    # after it was deleted, and deleting a file never touches its batches.
    input_file = models.ForeignKey(File, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+")
    output_file = models.ForeignKey(
        File, null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    error_file = models.ForeignKey(
        File, null=True, blank=True, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
    )
    errors = models.JSONField(default=list, blank=True, help_text="Why the input file was refused (by line).")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    tenant = models.ForeignKey("tenants.Tenant", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    total = models.PositiveIntegerField(default=0, help_text="Lines in the input file (once validated).")
    lines_created = models.PositiveIntegerField(default=0, help_text="Lines whose job exists.")
    # The final counts, written by the finalizer; while the batch runs they are read from Redis.
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    expires_at = models.DateTimeField()
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "batches"
        indexes = [models.Index(fields=["status", "updated_at"], name="batch_status_updated")]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def transition(self, target: str, **fields: Any) -> bool:
        """Move to ``target`` if the current row allows it (and stamp ``<target>_at``); whether this call won.

        ``fields`` are written in the same UPDATE. After a move into a final status commits,
        ``batches.hooks.ended`` runs once.
        """
        now = timezone.now()
        stamp = f"{target}_at"
        values = {stamp: now, **fields} if hasattr(self, stamp) else dict(fields)
        updated = Batch.objects.filter(pk=self.pk, status__in=TRANSITIONS[target]).update(
            status=target, updated_at=now, **values
        )
        if not updated:
            self.refresh_from_db()
            return False
        self.status, self.updated_at = target, now
        for name, value in values.items():
            setattr(self, name, value)
        if target in FINAL_STATUSES:
            batch = self
            transaction.on_commit(lambda: hooks.ended(batch))
        return True

    def as_openai(self, counts: dict[str, int] | None = None) -> dict[str, Any]:
        """OpenAI's ``Batch`` object; ``counts``: the live request counts (else the row's)."""
        counts = counts or {"total": self.total, "completed": self.completed, "failed": self.failed}
        errors = (
            {"object": "list", "data": [{"param": None, **e} for e in self.errors]}
            if self.status == BatchStatus.FAILED or self.errors
            else None
        )
        prompt, completion = self.prompt_tokens, self.completion_tokens
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": _unix(self.created_at),
            "in_progress_at": _unix(self.in_progress_at),
            "expires_at": _unix(self.expires_at),
            "finalizing_at": _unix(self.finalizing_at),
            "completed_at": _unix(self.completed_at),
            "failed_at": _unix(self.failed_at),
            "expired_at": _unix(self.expired_at),
            "cancelling_at": _unix(self.cancelling_at),
            "cancelled_at": _unix(self.cancelled_at),
            "request_counts": counts,
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": completion,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + completion,
            },
            "metadata": self.metadata or None,
            "priority": self.priority,
        }


def _unix(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None
