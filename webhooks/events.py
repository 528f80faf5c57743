"""Events become deliveries: ``publish`` (any app: batches call it) and the jobs hook.

An event goes to every enabled endpoint of its tenant (endpoints made with the tenant's API key)
and of its owner (endpoints a user made, which have no tenant) that subscribed to its type. Each
gets a delivery row with its own ``webhook-id`` and the exact body it will be sent, written in
the caller's transaction; after commit a sender is woken (a Redis list a worker's sender blocks
on), and a sender that missed the wake-up finds the row on its next poll: the row is the record.

The payload follows the Standard Webhooks shape::

    {"type": "job.succeeded", "timestamp": "2026-01-01T12:00:00.000000Z", "data": {...}}

``timestamp`` is when the event happened (a job's ``finished_at``), not when an attempt is sent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from redis.exceptions import RedisError

from orchestrator_site.redis import key, redis_client
from webhooks import subscribers
from webhooks.models import EVENT_TYPES, WebhookDelivery, WebhookEndpoint

log = logging.getLogger(__name__)

BELL_KEY = key("webhooks", "bell")
BELL_CAP = 64
# A job's final state -> its event type.
JOB_EVENTS = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "canceled": "job.canceled",
    "expired": "job.expired",
}


@dataclass(frozen=True)
class Event:
    """One thing that happened, for whoever subscribed to it."""

    type: str
    data: dict[str, Any]
    owner_id: int | None
    tenant_id: int | None
    occurred_at: datetime | None = None


def body(event: Event) -> str:
    """The JSON body of ``event``: compact, ASCII-only, so every attempt signs and sends the same bytes."""
    when = (event.occurred_at or timezone.now()).astimezone(UTC)
    document = {
        "type": event.type,
        "timestamp": when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "data": event.data,
    }
    return json.dumps(document, cls=DjangoJSONEncoder, separators=(",", ":"), ensure_ascii=True)


def publish(
    event_type: str,
    data: dict[str, Any],
    *,
    owner_id: int | None,
    tenant_id: int | None,
    occurred_at: datetime | None = None,
) -> int:
    """Owe ``event_type`` with ``data`` to every endpoint of ``owner_id``'s or ``tenant_id``'s that takes
    it; returns how many deliveries were made. Call it inside the transaction that commits the
    outcome (the deliveries commit with it) or after; sending starts after commit."""
    return publish_many([Event(event_type, data, owner_id, tenant_id, occurred_at)])


def publish_many(events: Sequence[Event]) -> int:
    """``publish`` for many events: one query for their endpoints, one INSERT for the deliveries."""
    for event in events:
        if event.type not in EVENT_TYPES:
            raise ValueError(f"Unknown webhook event type {event.type!r}.")
    wanted = [e for e in events if subscribers.wants(e.type, e.owner_id, e.tenant_id)]
    if not wanted:
        return 0
    tenant_ids = {e.tenant_id for e in wanted if e.tenant_id is not None}
    owner_ids = {e.owner_id for e in wanted if e.owner_id is not None}
    scope = Q(pk__in=[])
    if tenant_ids:
        scope |= Q(tenant_id__in=tenant_ids)
    if owner_ids:
        scope |= Q(owner_id__in=owner_ids, tenant__isnull=True)
    fields = ("id", "owner_id", "tenant_id", "events", "enabled")
    endpoints = list(WebhookEndpoint.objects.filter(scope, enabled=True).only(*fields))
    now = timezone.now()
    give_up_at = now + timedelta(seconds=settings.WEBHOOK_RETRY_WINDOW_S)
    rows = [
        WebhookDelivery(
            endpoint=endpoint,
            event_type=event.type,
            payload=text,
            next_attempt_at=now,
            give_up_at=give_up_at,
            created_at=now,
        )
        for event in wanted
        for text in [body(event)]
        for endpoint in _receivers(endpoints, event)
    ]
    if not rows:
        return 0
    WebhookDelivery.objects.bulk_create(rows)
    transaction.on_commit(wake_senders)
    return len(rows)


def _receivers(endpoints: Iterable[WebhookEndpoint], event: Event) -> list[WebhookEndpoint]:
    return [
        e
        for e in endpoints
        if e.receives(event.type)
        and (
            (e.tenant_id is not None and e.tenant_id == event.tenant_id)
            or (e.tenant_id is None and event.owner_id is not None and e.owner_id == event.owner_id)
        )
    ]


def wake_senders() -> None:
    """Ring the bell an idle sender blocks on (one ring wakes one sender, which takes all that is due)."""
    try:
        pipe = redis_client().pipeline(transaction=False)
        pipe.lpush(BELL_KEY, 1)
        pipe.ltrim(BELL_KEY, 0, BELL_CAP - 1)
        pipe.execute()
    except RedisError as exc:  # a sender's next poll finds the deliveries anyway
        log.warning("webhook senders not woken", extra={"error": str(exc)})


def job_event(job: Any) -> Event | None:
    """The event of a job that reached a final state, with its status document as ``data`` (as
    ``GET /jobs/<id>`` shows it, plus ``output``)."""
    from jobs.api.serializers import public

    event_type = JOB_EVENTS.get(str(job.state))
    if event_type is None:
        return None
    return Event(
        event_type,
        public(job.status_document(), with_output=True),
        job.created_by_id,
        job.tenant_id,
        job.finished_at,
    )


def jobs_ended(jobs: Sequence[Any]) -> None:
    """``jobs.hooks.on_ended``: jobs reached a final state (committed). Without a subscriber among
    their owners and tenants this is a dictionary look-up per job: no query, no Redis."""
    interested = [
        job
        for job in jobs
        if job.batch_id is None  # a batch's lines are told of once, by its batch.* event, not 50,000 times
        and (event_type := JOB_EVENTS.get(str(job.state))) is not None
        and subscribers.wants(event_type, job.created_by_id, job.tenant_id)
    ]
    if not interested:
        return
    events = [event for job in interested if (event := job_event(job)) is not None]
    with transaction.atomic():
        publish_many(events)


def batch_ended(batch: Any) -> None:
    """``batches.hooks.on_batch_ended``: ``batch.<status>`` with OpenAI's Batch object as its data."""
    event_type = f"batch.{batch.status}"
    if event_type in EVENT_TYPES:
        publish(event_type, batch.as_openai(), owner_id=batch.created_by_id, tenant_id=batch.tenant_id)
