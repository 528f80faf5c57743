"""Which tenant a request acts for: the API key's tenant, else the user's membership, else none.

Submitting a job asks this on every request, so a user's membership is remembered per process for
``AUTH_TOKEN_CACHE_S`` (as the token itself is, ``orchestrator_site.auth``): a user moved to another
tenant submits as the new one within that many seconds in every process.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from django.conf import settings

from tenants.models import ApiKey, Membership, Tenant

MAX_ENTRIES = 4096

_lock = threading.Lock()
_members: dict[int, tuple[float, Tenant | None]] = {}  # user id -> (expires at, tenant)


def tenant_of(request: Any) -> Tenant | None:
    """The tenant ``request`` acts for (a DRF request, or anything with ``auth`` and ``user``)."""
    auth = getattr(request, "auth", None)
    if isinstance(auth, ApiKey):
        return auth.tenant
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return None
    return tenant_of_user(user.pk)


def tenant_of_user(user_id: int) -> Tenant | None:
    ttl = float(settings.AUTH_TOKEN_CACHE_S)
    now = time.monotonic()
    if ttl > 0:
        with _lock:
            hit = _members.get(user_id)
        if hit is not None and hit[0] > now:
            return hit[1]
    membership = Membership.objects.select_related("tenant").filter(user_id=user_id).first()
    tenant = membership.tenant if membership else None
    if ttl > 0:
        with _lock:
            if len(_members) >= MAX_ENTRIES:
                _members.clear()
            _members[user_id] = (now + ttl, tenant)
    return tenant


def forget(user_id: int | None = None) -> None:
    """Drop remembered memberships (one user's, or all): membership changes call this in-process."""
    with _lock:
        if user_id is None:
            _members.clear()
        else:
            _members.pop(user_id, None)
