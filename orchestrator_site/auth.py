"""API token authentication that remembers a token for a few seconds in each process.

DRF's ``TokenAuthentication`` reads the token and its user on every request: one joined query,
the largest single cost of ``POST /jobs`` after the insert itself (docs/performance.md). A
program submitting jobs sends the same token again and again, so each process keeps the answer for
``AUTH_TOKEN_CACHE_S`` (default 5 s; 0 turns the cache off). The price is that a deleted token or a
deactivated user is refused by every process within that many seconds rather than at once; the
processes keep at most ``MAX_ENTRIES`` tokens. Each request gets its own copy of the user.

A tenant's API key (``llmo_…``, ``tenants.keys``) is taken where a token is, after either keyword:
the request then acts as the tenant (``request.auth`` is the key, with its tenant; ``request.user``
the tenant's service user). ``Bearer`` is accepted beside ``Token`` because OpenAI's clients send it.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed, PermissionDenied

from tenants import keys

MAX_ENTRIES = 1024

_lock = threading.Lock()
_cache: dict[str, tuple[float, Any, Any]] = {}  # key -> (expires at, user, token)


class CachedTokenAuthentication(TokenAuthentication):
    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        if keys.is_tenant_key(key):
            return tenant_key_credentials(key)
        ttl = float(settings.AUTH_TOKEN_CACHE_S)
        if ttl <= 0:
            return super().authenticate_credentials(key)
        now = time.monotonic()
        with _lock:
            hit = _cache.get(key)
        if hit is not None and hit[0] > now:
            return copy.copy(hit[1]), hit[2]
        user, token = super().authenticate_credentials(key)  # raises AuthenticationFailed when bad
        with _lock:
            if len(_cache) >= MAX_ENTRIES:
                _cache.clear()  # rare (more than MAX_ENTRIES live tokens in a few seconds): start over
            _cache[key] = (now + ttl, copy.copy(user), token)
        return user, token


class BearerAuthentication(CachedTokenAuthentication):
    """``Authorization: Bearer <token or tenant key>``: the same credentials as ``Token``."""

    keyword = "Bearer"


class BearerScheme(OpenApiAuthenticationExtension):
    """The schema's name for ``Bearer`` (drf-spectacular would call it ``tokenAuth`` like ``Token``)."""

    target_class = "orchestrator_site.auth.BearerAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A tenant's API key (llmo_…) or a user's API token.",
        }


def tenant_key_credentials(raw: str) -> tuple[Any, Any]:
    """(service user, key) for a live key of an enabled tenant; 401 for an unknown or revoked key,
    403 naming the tenant when it is disabled."""
    found = keys.lookup(raw)
    if found is None:
        raise AuthenticationFailed("Invalid API key.")
    key, user = found
    if key.revoked:
        raise AuthenticationFailed(f"API key {key.prefix}… was revoked.")
    if not key.tenant.enabled:
        raise PermissionDenied(f"Tenant {key.tenant.name!r} is disabled.")
    keys.touch(key)
    return user, key


def forget_all() -> None:
    """Drop every remembered token (tests; an operator revoking a token can also wait a few seconds)."""
    with _lock:
        _cache.clear()
    keys.forget()
