"""The backend registry and the routing policies, both edited by operators in the admin."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

if TYPE_CHECKING:
    from workers.backends.base import BackendConfig


log = logging.getLogger(__name__)


class BackendKind(models.TextChoices):
    DEV = "dev", "Dev (built-in, deterministic)"
    OLLAMA = "ollama", "Ollama"
    OPENAI = "openai", "OpenAI-compatible API"
    HF_LOCAL = "hf_local", "Hugging Face model on a GPU host"


# Kinds that hold a model in a worker process's memory; they run only in workers
# started for their pool (see Backend.queue_for).
POOLED_KINDS = {BackendKind.HF_LOCAL}


def config_number(
    config: Mapping[str, Any], name: str, default: float, *, minimum: float = 0.0, maximum: float | None = None
) -> float:
    """A number from a backend's ``config`` JSON; an operator's typo must not crash every worker:
    log it and use the default."""
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        log.warning("bad backend config setting; using the default", extra={"setting": name, "value": repr(value)})
        return default
    return min(value, maximum) if maximum is not None else value


def validate_base_url(value: str) -> None:
    """An http(s) URL; single-label hosts (``http://ollama:11434``, a compose service) are fine."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise ValidationError("Enter a valid http(s) URL.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise ValidationError("Enter a valid http(s) URL.")
    # Credentials and link-local/metadata hosts are refused (workers.backends.outbound says why).
    from workers.backends.outbound import url_problem

    problem = url_problem(value)
    if problem:
        raise ValidationError(problem)


class Backend(models.Model):
    """One place a job can run: an API endpoint or a model resident on a worker pool."""

    name = models.SlugField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=BackendKind.choices, default=BackendKind.DEV)
    base_url = models.CharField(max_length=500, blank=True, validators=[validate_base_url])
    model = models.CharField(max_length=200, blank=True, help_text="Model name sent to the backend.")
    api_key = models.CharField(max_length=500, blank=True, help_text="Write-only: never shown or returned.")
    enabled = models.BooleanField(default=True)
    drain = models.BooleanField(
        default=False,
        help_text="Draining: routing sends it no new jobs and no fallbacks; jobs already queued for it still run.",
    )
    supports_multimodal = models.BooleanField(default=False)
    max_context_tokens = models.PositiveIntegerField(default=8192, validators=[MinValueValidator(1)])
    max_concurrency = models.PositiveIntegerField(default=16, validators=[MinValueValidator(1)])
    weight = models.PositiveIntegerField(default=1)
    cost_input_per_1k = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    cost_output_per_1k = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    timeout_s = models.PositiveIntegerField(default=60, validators=[MinValueValidator(1)])
    config = models.JSONField(default=dict, blank=True, help_text="Kind-specific settings, e.g. dev: latency_ms.")
    pool = models.SlugField(
        max_length=64,
        blank=True,
        help_text="Worker pool for resident-model kinds (hf_local). Jobs go to queues '<pool>-high|normal|low'.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.kind in POOLED_KINDS and not self.pool:
            raise ValidationError({"pool": f"A {self.kind} backend needs a worker pool."})
        if self.kind in {BackendKind.OLLAMA, BackendKind.OPENAI} and not self.base_url:
            raise ValidationError({"base_url": f"A {self.kind} backend needs a base URL."})
        if not isinstance(self.config, dict):
            raise ValidationError({"config": "Must be a JSON object."})

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key)

    def adapter_config(self) -> BackendConfig:
        """This row as adapters and probes see it (no ORM object crosses into workers.backends)."""
        from workers.backends.base import BackendConfig

        return BackendConfig(
            name=self.name,
            kind=self.kind,
            base_url=self.base_url,
            model=self.model,
            api_key=self.api_key,
            timeout_s=float(self.timeout_s),
            config=dict(self.config),
        )

    def queue_for(self, priority: str) -> str:
        """The RQ queue a job for this backend goes to: API kinds share high/normal/low."""
        return f"{self.pool}-{priority}" if self.pool else priority

    def cost_for(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (
            self.cost_input_per_1k * Decimal(prompt_tokens) + self.cost_output_per_1k * Decimal(completion_tokens)
        ) / Decimal(1000)


class RoutingPolicy(models.Model):
    """A named strategy with parameters; exactly one is active (enforced by a partial unique index).

    Operators' writes (create, edit, activate, delete) go through :mod:`routing.policies`, which audits them.
    """

    name = models.SlugField(max_length=64, unique=True)
    strategy = models.CharField(max_length=32, help_text="A registered routing strategy, e.g. 'ordered'.")
    params = models.JSONField(default=dict, blank=True)
    description = models.TextField(blank=True)
    is_active = models.BooleanField(default=False, editable=False)
    version = models.PositiveIntegerField(default=1, editable=False, help_text="Bumped on every change.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "routing policies"
        constraints = [
            models.UniqueConstraint(fields=["is_active"], condition=Q(is_active=True), name="one_active_policy"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.strategy})"

    def save(self, *args, **kwargs) -> None:
        if self.pk is not None:
            self.version = F("version") + 1
        super().save(*args, **kwargs)
        if self.pk is not None and not isinstance(self.version, int):
            self.refresh_from_db(fields=["version"])

    def clean(self) -> None:
        from routing.strategies import get_strategy

        try:
            strategy = get_strategy(self.strategy)
        except KeyError as exc:
            raise ValidationError({"strategy": str(exc.args[0])}) from None
        if not isinstance(self.params, dict):
            raise ValidationError({"params": "Must be a JSON object."})
        try:
            strategy.validate_params(self.params)
        except ValueError as exc:
            raise ValidationError({"params": str(exc)}) from None


class PolicyAction(models.TextChoices):
    CREATE = "create"
    UPDATE = "update"
    ACTIVATE = "activate"
    DELETE = "delete"


class PolicyChange(models.Model):
    """The audit log of routing policies: who changed which policy, when, from what to what.

    Append-only. For ``activate``, ``before`` is the policy that was active until then.
    Names are copied so an entry outlives its policy and its user.
    """

    policy = models.ForeignKey(RoutingPolicy, null=True, blank=True, on_delete=models.SET_NULL, related_name="changes")
    policy_name = models.CharField(max_length=64)
    action = models.CharField(max_length=16, choices=PolicyAction.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    username = models.CharField(max_length=150, blank=True)
    source = models.CharField(max_length=16, help_text="admin, api or shell.")
    at = models.DateTimeField(default=timezone.now, db_index=True)
    version = models.PositiveIntegerField(null=True, blank=True, help_text="The policy's version after the change.")
    before = models.JSONField(default=dict, blank=True)
    after = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name = "policy change"

    def __str__(self) -> str:
        return f"{self.action} {self.policy_name} by {self.username or '(system)'} at {self.at:%Y-%m-%d %H:%M:%S}"
