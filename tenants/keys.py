"""A presented tenant API key: which key and service user it is, remembered per process.

A program submitting jobs sends its key on every request, so each process remembers a checked key
for ``AUTH_TOKEN_CACHE_S`` as it does user tokens (``orchestrator_site.auth``): a hit costs no query.
The price is the same: a key revoked or a tenant disabled in another process is refused here within
that many seconds (at once in the process that made the change, which calls :func:`forget`).

A key acts as its tenant's *service user* (``tenant:<id>``, no usable password, created on first
use), which owns the jobs the key submits: the owner-based visibility of jobs then needs no special
case, and every key of a tenant sees the jobs of the others.
"""

from __future__ import annotations

import copy
import threading
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from tenants.models import KEY_PREFIX, ApiKey, Tenant, hash_key

MAX_ENTRIES = 1024
LAST_USED_EVERY_S = 60  # last_used_at is written at most this often per key and process
SERVICE_USER_PREFIX = "tenant:"  # ':' is not allowed in usernames made through forms: no person can take one

_lock = threading.Lock()
_cache: dict[str, tuple[float, ApiKey, Any]] = {}  # key hash -> (expires at, key with tenant, service user)


def is_tenant_key(raw: str) -> bool:
    return raw.startswith(KEY_PREFIX)


def service_username(tenant_id: int) -> str:
    return f"{SERVICE_USER_PREFIX}{tenant_id}"


def is_service_user(user: Any) -> bool:
    return str(getattr(user, "username", "")).startswith(SERVICE_USER_PREFIX)


def service_user(tenant: Tenant) -> Any:
    """The user the tenant's keys act as; created on first use."""
    User = get_user_model()
    name = service_username(tenant.pk)
    user = User.objects.filter(username=name).first()
    if user is not None:
        return user
    user = User(username=name, first_name=f"{tenant.name} (API keys)"[:150])
    user.set_unusable_password()
    try:
        with transaction.atomic():  # two processes may create it at once: one wins, both use it
            user.save()
    except IntegrityError:
        user = User.objects.get(username=name)
    return user


def lookup(raw: str) -> tuple[ApiKey, Any] | None:
    """The key (with its tenant) and the service user it acts as; None for an unknown key.

    A revoked key is returned too (the caller refuses it with its own message); each call gets its
    own copies, so a request may not change what the next one sees.
    """
    digest = hash_key(raw)
    ttl = float(settings.AUTH_TOKEN_CACHE_S)
    now = time.monotonic()
    if ttl > 0:
        with _lock:
            hit = _cache.get(digest)
        if hit is not None and hit[0] > now:
            return copy.copy(hit[1]), copy.copy(hit[2])
    key = ApiKey.objects.select_related("tenant").filter(key_hash=digest).first()
    if key is None:
        return None
    user = service_user(key.tenant)
    if ttl > 0:
        with _lock:
            if len(_cache) >= MAX_ENTRIES:
                _cache.clear()
            _cache[digest] = (now + ttl, key, user)
    return copy.copy(key), copy.copy(user)


def touch(key: ApiKey) -> None:
    """Record that ``key`` was used: one UPDATE at most every ``LAST_USED_EVERY_S`` per key and process
    (its condition keeps several processes from rewriting it within the same minute)."""
    now = timezone.now()
    every = timedelta(seconds=LAST_USED_EVERY_S)
    if key.last_used_at is not None and now - key.last_used_at < every:
        return
    ApiKey.objects.filter(pk=key.pk).filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - every)).update(
        last_used_at=now
    )
    with _lock:
        hit = _cache.get(key.key_hash)
    if hit is not None:
        hit[1].last_used_at = now
    key.last_used_at = now


def forget(key_hash: str | None = None) -> None:
    """Drop remembered keys (one, by its hash, or all): revocation and tenant changes call this."""
    with _lock:
        if key_hash is None:
            _cache.clear()
        else:
            _cache.pop(key_hash, None)
