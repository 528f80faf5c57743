"""The operators' audit log: every change an operator makes to a backend or a job, from the admin or the API."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class AuditEntry(models.Model):
    """One operator change: who, when, from where, to what, and field by field what changed.

    Append-only. The target is named by label, id and name (copied), so an entry outlives the
    row it describes and its user. ``changes`` maps a field to ``[from, to]``; a secret field
    (a backend's API key) is recorded as changed, never with its value.
    """

    at = models.DateTimeField(default=timezone.now, db_index=True)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    username = models.CharField(max_length=150, blank=True)
    source = models.CharField(max_length=16, help_text="admin, api or shell.")
    action = models.CharField(max_length=32, db_index=True)
    target_type = models.CharField(max_length=64, help_text="The model changed, e.g. routing.backend or jobs.job.")
    target_id = models.CharField(max_length=64)
    target_name = models.CharField(max_length=200, blank=True)
    changes = models.JSONField(default=dict, blank=True)
    detail = models.CharField(
        max_length=500, blank=True, help_text="An outcome without a field, e.g. a probe's status."
    )

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name = "audit entry"
        verbose_name_plural = "audit entries"
        indexes = [models.Index(fields=["target_type", "target_id"])]

    def __str__(self) -> str:
        target = self.target_name or self.target_id
        return f"{self.action} {target} by {self.username or '(system)'} at {self.at:%Y-%m-%d %H:%M:%S}"
