"""Webhook endpoints, the deliveries owed to them and every attempt to send one.

An endpoint belongs to a tenant (made with the tenant's API key: it receives the events of all the
tenant's jobs and batches) or to a user (the events of the jobs and batches that user owns). A
delivery is one event owed to one endpoint: its ``message_id`` is the Standard Webhooks
``webhook-id``, the same on every attempt, and its ``payload`` the exact body signed and sent, so a
retry sends the same bytes. The delivery row is the record; Redis only wakes a sender.

A delivery's state changes in one place, the methods below, each a compare-and-set on the row:

- ``pending`` → claimed by a sender (``claim_due``: its ``next_attempt_at`` moves a lease ahead, so
  a sender that dies mid-send leaves it due again once the lease passes: at-least-once);
- an attempt's outcome (``record_attempt``): ``succeeded``; or ``pending`` again at the next time
  of its backoff; or ``failed`` once that time would fall past ``give_up_at`` (or on ``410 Gone``);
- ``resend``: ``pending`` and due now, with a new retry window (the admin's action).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import F, Q
from django.utils import timezone

TEXT_MAX = 2000  # an attempt's error or a delivery's last error, as kept
RESPONSE_KEPT = 500  # characters of a receiver's answer kept on the attempt


class EventType(models.TextChoices):
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELED = "job.canceled"
    JOB_EXPIRED = "job.expired"
    BATCH_COMPLETED = "batch.completed"
    BATCH_FAILED = "batch.failed"
    BATCH_EXPIRED = "batch.expired"
    BATCH_CANCELLED = "batch.cancelled"


EVENT_TYPES = frozenset(EventType.values)


class DeliveryState(models.TextChoices):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # gave up: past its retry window, 410 Gone, or its endpoint is disabled


def events_problem(events: Any) -> str | None:
    """Why ``events`` is not a list of event type names, or None."""
    if not isinstance(events, list) or not events:
        return f"A non-empty list of event types, from: {', '.join(EventType.values)}."
    unknown = [e for e in events if not isinstance(e, str) or e not in EVENT_TYPES]
    if unknown:
        return f"Unknown event type(s): {', '.join(map(str, unknown))}. Known: {', '.join(EventType.values)}."
    return None


class WebhookEndpoint(models.Model):
    """A URL that receives the signed events of its tenant's (or owner's) jobs and batches."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="webhook_endpoints",
        help_text="Who made it. Without a tenant, it receives the events of this user's jobs and batches.",
    )
    tenant = models.ForeignKey(
        "tenants.Tenant",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="webhook_endpoints",
        help_text="Made with the tenant's API key: it receives the events of all the tenant's jobs and batches.",
    )
    url = models.URLField(max_length=2000, help_text="http(s) URL on a public address; no redirects are followed.")
    events = models.JSONField(default=list, help_text="The event types it receives.")
    description = models.CharField(max_length=200, blank=True)
    # The signing secret (whsec_<base64>): kept as it is, since signing needs it (a hash could not
    # sign), like a backend's API key; shown once when made or rotated, never again.
    secret = models.CharField(max_length=128, editable=False)
    enabled = models.BooleanField(default=True, help_text="A disabled endpoint is sent nothing.")
    disabled_reason = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "webhook endpoint"

    def __str__(self) -> str:
        return f"#{self.pk} {self.url}"

    def clean(self) -> None:
        from webhooks import destination

        errors: dict[str, str] = {}
        if problem := events_problem(self.events):
            errors["events"] = problem
        if self.url and (problem := destination.url_problem(self.url)):
            errors["url"] = problem
        if errors:
            raise ValidationError(errors)

    def receives(self, event_type: str) -> bool:
        return self.enabled and event_type in (self.events or ())


def new_message_id() -> str:
    """A ``webhook-id``: ``msg_`` and 32 hex digits (no ``.``, which the signed content delimits with)."""
    return f"msg_{uuid.uuid4().hex}"


class WebhookDelivery(models.Model):
    """One event owed to one endpoint, until it was answered 2xx or given up."""

    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    event_type = models.CharField(max_length=32, choices=EventType.choices)
    message_id = models.CharField(max_length=64, unique=True, default=new_message_id, help_text="webhook-id")
    payload = models.TextField(help_text="The JSON body, exactly as signed and sent on every attempt.")
    state = models.CharField(max_length=16, choices=DeliveryState.choices, default=DeliveryState.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # ``attempts`` when the current retry window began (a resend starts a new one): the backoff counts from it.
    round_start = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(
        null=True, blank=True, help_text="Due then (a claim moves it a lease ahead)."
    )
    give_up_at = models.DateTimeField(help_text="No attempt is scheduled after this.")
    claim = models.CharField(max_length=32, blank=True, editable=False)  # the sender that holds it
    last_status = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "webhook deliveries"
        indexes = [
            # A sender's "what is due": only pending rows are in it.
            models.Index(fields=["next_attempt_at"], condition=Q(state="pending"), name="webhook_delivery_due"),
            models.Index(fields=["endpoint", "created_at"], name="webhook_delivery_endpoint"),
            models.Index(fields=["state", "created_at"], name="webhook_delivery_state"),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.message_id} ({self.state})"

    # --- the state machine ------------------------------------------------------------------------
    @classmethod
    def claim_due(
        cls, limit: int, lease: timedelta, *, due_by: datetime | None = None
    ) -> tuple[str, list[WebhookDelivery]]:
        """Take up to ``limit`` deliveries due now (or by ``due_by``) for one sender; returns (its claim
        token, the rows).

        Two statements: one UPDATE moves each due row's ``next_attempt_at`` a lease ahead and stamps
        the token (a row another sender took meanwhile is no longer due, so it is not taken twice),
        one SELECT reads what this token holds, with the endpoints.
        """
        now = timezone.now()
        due_by = min(due_by or now, now)
        due = cls.objects.filter(state=DeliveryState.PENDING, next_attempt_at__lte=due_by)
        ids = list(due.order_by("next_attempt_at").values_list("pk", flat=True)[:limit])
        if not ids:
            return "", []
        token = uuid.uuid4().hex
        cls.objects.filter(pk__in=ids, state=DeliveryState.PENDING, next_attempt_at__lte=due_by).update(
            next_attempt_at=now + lease, claim=token
        )
        rows = list(cls.objects.select_related("endpoint").filter(pk__in=ids, claim=token).order_by("next_attempt_at"))
        return token, rows

    def record_attempt(
        self,
        token: str,
        *,
        succeeded: bool,
        status_code: int | None,
        latency_ms: int | None,
        error: str,
        response: str = "",
        retry_in: timedelta | None,
        worker: str = "",
        disable_endpoint: str = "",
    ) -> bool:
        """Write one attempt and what follows from it; False when this sender no longer held the delivery
        (its lease passed and another sender took it: the attempt is logged all the same).

        ``retry_in``: when to try again (None: never, the delivery fails). ``disable_endpoint``: a reason
        to disable the endpoint (the receiver answered 410 Gone).
        """
        now = timezone.now()
        error = error[:TEXT_MAX]
        with transaction.atomic():
            held = WebhookDelivery.objects.filter(pk=self.pk, claim=token, state=DeliveryState.PENDING)
            fields: dict[str, Any] = {
                "attempts": F("attempts") + 1,
                "last_status": status_code,
                "last_error": error,
                "updated_at": now,
            }
            if succeeded:
                fields.update(state=DeliveryState.SUCCEEDED, delivered_at=now, next_attempt_at=None, claim="")
            elif retry_in is not None and now + retry_in <= self.give_up_at:
                fields.update(next_attempt_at=now + retry_in, claim="")
            else:
                fields.update(state=DeliveryState.FAILED, next_attempt_at=None, claim="")
            won = bool(held.update(**fields))
            if not won:  # still counted: the receiver did get this request
                WebhookDelivery.objects.filter(pk=self.pk).update(attempts=F("attempts") + 1, updated_at=now)
            self.refresh_from_db()
            WebhookAttempt.objects.create(
                delivery=self,
                number=self.attempts,
                at=now,
                succeeded=succeeded,
                status_code=status_code,
                latency_ms=latency_ms,
                error=error,
                response=response[:RESPONSE_KEPT],
                worker=worker[:200],
            )
            if disable_endpoint:
                WebhookEndpoint.objects.filter(pk=self.endpoint_id, enabled=True).update(
                    enabled=False, disabled_reason=disable_endpoint[:200], updated_at=now
                )
        return won

    def fail_unsent(self, token: str, reason: str) -> bool:
        """End a claimed delivery ``failed`` without a request (its endpoint is disabled)."""
        return bool(
            WebhookDelivery.objects.filter(pk=self.pk, claim=token, state=DeliveryState.PENDING).update(
                state=DeliveryState.FAILED, next_attempt_at=None, claim="", last_error=reason, updated_at=timezone.now()
            )
        )

    @classmethod
    def resend(cls, ids: list[int], now: datetime | None = None) -> int:
        """Due now, with a new retry window (whatever their state); returns how many. Call
        ``webhooks.events.wake_senders`` after commit so a sender takes them at once."""
        now = now or timezone.now()
        return cls.objects.filter(pk__in=ids).update(
            state=DeliveryState.PENDING,
            next_attempt_at=now,
            give_up_at=now + timedelta(seconds=settings.WEBHOOK_RETRY_WINDOW_S),
            round_start=F("attempts"),
            claim="",
            updated_at=now,
        )


class WebhookAttempt(models.Model):
    """One request sent for a delivery (or refused before sending), with what came back."""

    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="attempt_log")
    number = models.PositiveIntegerField()
    at = models.DateTimeField(default=timezone.now)
    succeeded = models.BooleanField(default=False)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True, help_text="Empty: no HTTP answer.")
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    response = models.TextField(blank=True, help_text="The start of the receiver's answer.")
    worker = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["delivery", "number", "id"]
        indexes = [models.Index(fields=["delivery", "number"], name="webhook_attempt_delivery")]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.delivery_id}"
