"""Who has webhook endpoints, remembered per process: the question every job's end asks first.

``jobs.hooks`` calls ``webhooks.events.jobs_ended`` on the hot path of every job's end, in workers,
the reconciler and the web tier; nearly always nobody has subscribed, and answering that must
cost nothing. So each process keeps the owners and tenants that have enabled endpoints (with the
event types they take) in memory, and trusts it for ``WEBHOOK_ENDPOINTS_CACHE_S``; then it reads a
version from Redis (one GET), and reloads the list from the database only when the version
changed. Every save or delete of an endpoint writes a new version after commit and drops this process's
copy at once: other processes follow within ``WEBHOOK_ENDPOINTS_CACHE_S``. If Redis does not
answer, the list is reloaded from the database instead.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import transaction
from redis.exceptions import RedisError

from orchestrator_site.redis import key, redis_client

log = logging.getLogger(__name__)
VERSION_KEY = key("webhooks", "endpoints-version")


@dataclass(frozen=True)
class Subscribers:
    """Enabled endpoints' scopes: tenant id -> event types, owner id (endpoints without a tenant) -> event types."""

    tenants: dict[int, frozenset[str]] = field(default_factory=dict)
    owners: dict[int, frozenset[str]] = field(default_factory=dict)

    def wants(self, event_type: str, owner_id: int | None, tenant_id: int | None) -> bool:
        if tenant_id is not None and event_type in self.tenants.get(tenant_id, ()):
            return True
        return owner_id is not None and event_type in self.owners.get(owner_id, ())


_lock = threading.Lock()
_cached: tuple[float, bytes | None, Subscribers] | None = None  # (checked at, version, list)


def _load() -> Subscribers:
    from webhooks.models import WebhookEndpoint

    tenants: dict[int, set[str]] = {}
    owners: dict[int, set[str]] = {}
    rows = WebhookEndpoint.objects.filter(enabled=True).values_list("owner_id", "tenant_id", "events")
    for owner_id, tenant_id, events in rows:
        scope = tenants.setdefault(tenant_id, set()) if tenant_id is not None else owners.setdefault(owner_id, set())
        scope.update(e for e in events or () if isinstance(e, str))
    return Subscribers(
        tenants={k: frozenset(v) for k, v in tenants.items()}, owners={k: frozenset(v) for k, v in owners.items()}
    )


def _version() -> bytes | None:
    try:
        return redis_client().get(VERSION_KEY) or b"0"
    except RedisError as exc:
        log.warning("webhook endpoints version unreadable; reading the endpoints", extra={"error": str(exc)})
        return None


def current() -> Subscribers:
    """This process's list, checked against the version at most every ``WEBHOOK_ENDPOINTS_CACHE_S``."""
    global _cached
    ttl = float(settings.WEBHOOK_ENDPOINTS_CACHE_S)
    now = time.monotonic()
    cached = _cached
    if cached is not None and now - cached[0] < ttl:
        return cached[2]
    version = _version()
    if cached is not None and version is not None and version == cached[1]:
        with _lock:
            _cached = (now, version, cached[2])
        return cached[2]
    found = _load()
    with _lock:
        _cached = (now, version, found)
    return found


def wants(event_type: str, owner_id: int | None, tenant_id: int | None) -> bool:
    """Whether any enabled endpoint of this owner or tenant may take ``event_type`` (cheap: no I/O
    while the list is fresh)."""
    return current().wants(event_type, owner_id, tenant_id)


def forget() -> None:
    """Drop this process's list (the next question reloads it)."""
    global _cached
    with _lock:
        _cached = None


def _bump() -> None:
    forget()
    try:
        # A new random value, not a counter: after Redis lost the key, a counter could come back to
        # a number some process still holds and pass for unchanged.
        redis_client().set(VERSION_KEY, uuid.uuid4().hex)
    except RedisError as exc:  # other processes then see the change when Redis is back
        log.warning("webhook endpoints version not bumped", extra={"error": str(exc)})


def changed(sender: Any = None, **kwargs: Any) -> None:
    """An endpoint was saved or deleted (a model signal): every process's list follows after commit."""
    forget()
    transaction.on_commit(_bump)
