"""When a failed delivery is tried again: exponential backoff with jitter, a pure function.

The n-th failure of a retry window waits ``WEBHOOK_RETRY_BASE_S * 2**(n-1)``, capped at
``WEBHOOK_RETRY_MAX_S``, times a random factor in [0.75, 1.25) so that the deliveries that failed
together (a receiver's outage) do not all come back at the same second. A receiver's
``Retry-After`` (429, 503) lengthens the wait, never shortens it, within the same cap. With the
defaults (5 s, 2 h) the waits are about 5 s, 10 s, 20 s, ... 85 min, then every 2 h: about 20
attempts in a 24 h window.
"""

from __future__ import annotations

import random
from datetime import timedelta

from django.conf import settings

JITTER = 0.25


def delay(failures: int, *, retry_after_s: float | None = None, rng: random.Random | None = None) -> timedelta:
    """The wait after the ``failures``-th failed attempt (1-based) of a retry window."""
    base = float(settings.WEBHOOK_RETRY_BASE_S)
    cap = float(settings.WEBHOOK_RETRY_MAX_S)
    exponent = min(max(failures, 1) - 1, 62)  # past this the cap has long applied
    seconds = min(base * (2.0**exponent), cap)
    seconds *= 1 + JITTER * (2 * (rng or random).random() - 1)
    if retry_after_s is not None:
        seconds = max(seconds, min(float(retry_after_s), cap))
    return timedelta(seconds=seconds)
