"""Tenants: who shares the fleet, what each may use, and the keys its programs present.

A tenant's limits are checked at submission (``tenants.admission``), its spend settled from the
real usage of its jobs, and its weight read where workers take jobs (``jobs.fair_queue``). A user
belongs to at most one tenant (``Membership``); an API key always acts as its tenant.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction
from django.utils import timezone
from redis.exceptions import RedisError

from jobs import fair_queue

log = logging.getLogger(__name__)

PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}  # lower is more urgent
KEY_PREFIX = "llmo_"


class BudgetPeriod(models.TextChoices):
    DAY = "day"
    MONTH = "month"


class Tenant(models.Model):
    """A team or customer sharing the fleet, with its limits. Null limits mean none."""

    name = models.SlugField(max_length=64, unique=True)
    description = models.CharField(max_length=200, blank=True)
    enabled = models.BooleanField(default=True, help_text="A disabled tenant's requests are refused (403).")
    rpm_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text="Submissions per minute; empty for no limit."
    )
    tokens_per_day = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="Prompt + completion tokens per UTC day; a job reserves its max_tokens at admission. Empty: none.",
    )
    budget_usd = models.DecimalField(
        max_digits=14,
        decimal_places=4,
        null=True,
        blank=True,
        help_text="Spend allowed per budget period; empty: none.",
    )
    budget_period = models.CharField(max_length=8, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTH)
    max_priority = models.CharField(
        max_length=8,
        choices=[("high", "high"), ("normal", "normal"), ("low", "low")],
        default="high",
        help_text="The highest priority its jobs may ask for (403 above it).",
    )
    allowed_backends = models.JSONField(
        default=list, blank=True, help_text="Backend names its jobs may use; empty for all."
    )
    weight = models.PositiveIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(1000)],
        help_text="Fair-share weight: its share of dispatches when several tenants wait at one priority.",
    )
    max_queued = models.PositiveIntegerField(null=True, blank=True, help_text="Jobs waiting at once; empty: none.")
    queue_timeout_s = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Default queue timeout of its jobs: not started within it, a job ends 'expired'. Empty: none.",
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args, **kwargs) -> None:
        super().save(*args, **kwargs)
        tenant, weight = str(self.pk), self.weight
        # A new weight governs the tenant's next dispatch, not only its next submission.
        transaction.on_commit(lambda: _set_weight(tenant, weight))

    def clean(self) -> None:
        names = self.allowed_backends
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValidationError({"allowed_backends": "A list of backend names."})
        self.allowed_backends = list(dict.fromkeys(names))

    def allows_priority(self, priority: str) -> bool:
        return PRIORITY_RANK.get(priority, 0) >= PRIORITY_RANK[self.max_priority]

    def allows_backend(self, name: str) -> bool:
        return not self.allowed_backends or name in self.allowed_backends


class Membership(models.Model):
    """A user's one tenant: the jobs the user submits are the tenant's."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tenant_membership")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    created_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant}"


def _set_weight(tenant: str, weight: int) -> None:
    try:
        fair_queue.set_weight(tenant, weight)
    except RedisError as exc:  # its next submission writes the weight too
        log.warning("tenant weight not published", extra={"tenant": tenant, "error": str(exc)})


def hash_key(raw: str) -> str:
    """Keys are long random strings, so one SHA-256 is enough (no slow hash needed against guessing)."""
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiKeyQuerySet(models.QuerySet):
    def live(self) -> ApiKeyQuerySet:
        return self.filter(revoked_at__isnull=True)


class ApiKey(models.Model):
    """A tenant's API key. Only its SHA-256 is stored; the key itself is shown once, at creation."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, help_text="The key's first characters, to recognise it.")
    key_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @classmethod
    def issue(cls, tenant: Tenant, name: str, created_by=None) -> tuple[ApiKey, str]:
        """A new key for ``tenant``: the saved row and the raw key (returned here only)."""
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(
            tenant=tenant, name=name, prefix=raw[: len(KEY_PREFIX) + 6], key_hash=hash_key(raw), created_by=created_by
        )
        return key, raw
