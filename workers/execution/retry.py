"""Retry timing for one job run: the whole-job deadline and backoff with full jitter.

Why full jitter (a uniform draw in ``[0, min(cap, base * 2**n)]``): when a backend hiccups, every
worker retries at once; spreading the retries over the whole interval keeps them from arriving as
a second wave (AWS Architecture Blog, "Exponential Backoff And Jitter"). A server's own
``Retry-After`` is a floor: retrying earlier only earns another 429.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from routing.models import config_number


@dataclass(frozen=True)
class RetryPolicy:
    """One backend's retry budget, from its ``config``: ``retry_max`` retries after the first try,
    backoff from ``retry_base_ms`` doubling per retry, capped at ``retry_cap_ms``."""

    retries: int = 2
    base_s: float = 0.5
    cap_s: float = 30.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> RetryPolicy:
        config = config or {}
        d = cls()
        return cls(
            retries=int(config_number(config, "retry_max", d.retries)),
            base_s=config_number(config, "retry_base_ms", d.base_s * 1000) / 1000,
            cap_s=config_number(config, "retry_cap_ms", d.cap_s * 1000) / 1000,
        )

    def backoff_s(self, retry: int, rng: random.Random | None = None) -> float:
        """The jittered wait before retry number ``retry`` (1 for the first retry)."""
        ceiling = min(self.cap_s, self.base_s * 2 ** max(retry - 1, 0))
        return (rng or random).uniform(0.0, ceiling)

    def delay_s(self, retry: int, retry_after_s: float | None = None, rng: random.Random | None = None) -> float:
        """The wait before retry ``retry``: the jittered backoff, never less than the server asked."""
        return max(self.backoff_s(retry, rng), retry_after_s or 0.0)


class Deadline:
    """The job's whole budget (all attempts and sleeps), on the monotonic clock."""

    def __init__(self, seconds: float, *, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self.seconds = seconds
        self.ends_at = clock() + seconds

    def remaining(self) -> float:
        return max(self.ends_at - self._clock(), 0.0)

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def allows_wait(self, wait_s: float, *, min_call_s: float = 0.05) -> bool:
        """Whether sleeping ``wait_s`` still leaves time for a call: never sleep into the deadline."""
        return wait_s + min_call_s < self.remaining()
