"""Audited writes to webhook endpoints and deliveries, from the admin or the API.

Each change commits with its audit entry (``audit.AuditEntry``); a secret is never written to the
log, only that it was set or rotated. A new secret is returned to the caller, who shows it once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import transaction

from audit import log
from webhooks import signing
from webhooks.events import wake_senders
from webhooks.models import WebhookDelivery, WebhookEndpoint

AUDITED_FIELDS = ("url", "events", "description", "enabled", "tenant_id", "owner_id")


def state(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {name: getattr(endpoint, name) for name in AUDITED_FIELDS}


def create(
    *,
    owner: Any,
    url: str,
    events: list[str],
    tenant: Any = None,
    description: str = "",
    enabled: bool = True,
    user: Any = None,
    source: str,
) -> WebhookEndpoint:
    """A new endpoint with a fresh secret (``endpoint.secret``: show it to the caller this once)."""
    endpoint = WebhookEndpoint(
        owner=owner,
        tenant=tenant,
        url=url,
        events=list(dict.fromkeys(events)),
        description=description,
        enabled=enabled,
        secret=signing.new_secret(),
    )
    with transaction.atomic():
        endpoint.save()
        log.record(endpoint, "create", user=user, source=source, changes=log.diff({}, state(endpoint)))
    return endpoint


def save(endpoint: WebhookEndpoint, before: dict[str, Any], *, user: Any = None, source: str) -> None:
    """Save an edited endpoint (``before``: its ``state`` when read); a new one gets its secret here."""
    with transaction.atomic():
        created = endpoint.pk is None
        if created and not endpoint.secret:
            endpoint.secret = signing.new_secret()
        endpoint.save()
        changes = log.diff(before, state(endpoint))
        if created or changes:
            log.record(endpoint, "create" if created else "update", user=user, source=source, changes=changes)


def rotate_secret(endpoint: WebhookEndpoint, *, user: Any = None, source: str) -> str:
    """A new signing secret, in force for the next attempt; returns it (show it this once)."""
    secret = signing.new_secret()
    with transaction.atomic():
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(secret=secret)
        endpoint.secret = secret
        log.record(endpoint, "rotate secret", user=user, source=source, changes={"secret": ["set", log.SECRET_CHANGED]})
    return secret


def delete(endpoint: WebhookEndpoint, *, user: Any = None, source: str) -> None:
    """Delete the endpoint and its deliveries (pending ones are not sent)."""
    with transaction.atomic():
        log.record(endpoint, "delete", user=user, source=source, changes=log.diff(state(endpoint), {}))
        endpoint.delete()


def resend(deliveries: Iterable[WebhookDelivery], *, user: Any = None, source: str) -> int:
    """Send these deliveries again now (same ``webhook-id``), each with a new retry window."""
    rows = list(deliveries)
    with transaction.atomic():
        count = WebhookDelivery.resend([d.pk for d in rows])
        for delivery in rows:
            name = f"{delivery.event_type} {delivery.message_id}"
            log.record(delivery, "resend", user=user, source=source, name=name)
        transaction.on_commit(wake_senders)
    return count
