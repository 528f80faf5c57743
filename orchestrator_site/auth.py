"""API token authentication that remembers a token for a few seconds in each process.

DRF's ``TokenAuthentication`` reads the token and its user on every request: one joined query,
the largest single cost of ``POST /jobs`` after the insert itself (docs/performance.md). A
program submitting jobs sends the same token again and again, so each process keeps the answer for
``AUTH_TOKEN_CACHE_S`` (default 5 s; 0 turns the cache off). The price is that a deleted token or a
deactivated user is refused by every process within that many seconds rather than at once; the
processes keep at most ``MAX_ENTRIES`` tokens. Each request gets its own copy of the user.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

from django.conf import settings
from rest_framework.authentication import TokenAuthentication

MAX_ENTRIES = 1024

_lock = threading.Lock()
_cache: dict[str, tuple[float, Any, Any]] = {}  # key -> (expires at, user, token)


class CachedTokenAuthentication(TokenAuthentication):
    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
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


def forget_all() -> None:
    """Drop every remembered token (tests; an operator revoking a token can also wait a few seconds)."""
    with _lock:
        _cache.clear()
