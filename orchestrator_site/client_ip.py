"""The client's address as login throttling sees it.

Directly exposed (``TRUSTED_PROXY_COUNT=0``, the default) it is ``REMOTE_ADDR``: a client can put
anything in ``X-Forwarded-For``, so that header is ignored. Behind N proxies that each append the
address they received the request from, the client is the Nth entry from the right; entries further
left came from the client and prove nothing.
"""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.http import HttpRequest


def _valid(address: str | None) -> str | None:
    # The throttle stores the address in an IP column: text that is no address must not reach it.
    try:
        return str(ipaddress.ip_address((address or "").strip()))
    except ValueError:
        return None


def client_ip(request: HttpRequest) -> str | None:
    """The address failed logins are counted against (``None`` when there is none)."""
    remote = _valid(request.META.get("REMOTE_ADDR"))
    proxies = getattr(settings, "TRUSTED_PROXY_COUNT", 0)
    if proxies:
        hops = [hop for hop in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if hop.strip()]
        if len(hops) >= proxies:
            return _valid(hops[-proxies]) or remote
    return remote
