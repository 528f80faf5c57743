"""The routing decision: the active policy ranks the eligible backends for one job."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from django.conf import settings
from redis.exceptions import RedisError

from routing import stats as live
from routing.eligibility import split_eligible
from routing.registry import Snapshot
from routing.strategies import BackendStats, JobFacts, get_strategy

log = logging.getLogger(__name__)


class RoutingError(Exception):
    """A job cannot be routed; ``status`` is the HTTP answer, ``field`` the input to blame."""

    status = 503
    field: str | None = None

    def __init__(self, message: str, *, rejected: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.rejected = rejected or {}


class NoActivePolicy(RoutingError):
    status = 503


class NoEligibleBackend(RoutingError):
    status = 503


class UnknownBackend(RoutingError):
    status = 400
    field = "backend"


class PinnedBackendIneligible(RoutingError):
    status = 422
    field = "backend"


@dataclass(frozen=True)
class Decision:
    policy: str
    policy_version: int
    backend: str
    candidates: list[dict]
    rejected: dict[str, str]
    reason: str
    job: dict = field(default_factory=dict)  # the JobFacts routing saw, so a replay sees the same

    def as_json(self) -> dict:
        return {
            "policy": self.policy,
            "policy_version": self.policy_version,
            "backend": self.backend,
            "reason": self.reason,
            "candidates": self.candidates,
            "rejected": self.rejected,
            "job": self.job,
        }


_stats_cache: dict[tuple[str, ...], tuple[float, dict[str, BackendStats]]] = {}


def read_live_stats(names: list[str], *, details: bool = False) -> dict[str, BackendStats]:
    """The workers' live figures, or none when Redis cannot say: routing then goes on without them.

    Routing reuses a read for ``ROUTING_STATS_MAX_AGE_S`` (default 0.25 s) per process: the
    figures move on the scale of calls that take seconds, while reading them is a Redis round trip
    that would otherwise be paid by every submission.
    """
    names_key = tuple(names)
    max_age = settings.ROUTING_STATS_MAX_AGE_S
    if not details and max_age > 0:
        hit = _stats_cache.get(names_key)
        if hit is not None and time.monotonic() - hit[0] < max_age:
            return hit[1]
    try:
        result = live.read_stats(names, details=details)
    except RedisError as exc:
        log.warning("live backend stats unavailable; routing without them", extra={"error": str(exc)})
        return {}
    if not details:
        if len(_stats_cache) > 64:
            _stats_cache.clear()
        _stats_cache[names_key] = (time.monotonic(), result)
    return result


def route(job: JobFacts, snap: Snapshot, stats: Mapping[str, BackendStats] | None = None) -> Decision:
    """Pick a backend for ``job`` under the active policy in ``snap``; raises RoutingError.

    ``stats`` are the live figures per backend; when None they are read from Redis here
    (one round trip). A caller that already talks to Redis can pipeline the read
    (``routing.stats.queue_read``) and pass them in.
    """
    policy = snap.policy
    if policy is None:
        raise NoActivePolicy("No routing policy is active; activate one in the admin or POST /policies/<id>/activate.")
    candidates = snap.candidates
    if job.pinned_backend:
        candidates = tuple(c for c in candidates if c.name == job.pinned_backend)
        if not candidates:
            raise UnknownBackend(f"No backend named {job.pinned_backend!r} is registered.")
    if stats is None:
        stats = read_live_stats([c.name for c in candidates])
    eligible, rejected = split_eligible(job, candidates, stats)
    if not eligible:
        if job.pinned_backend:
            why = rejected.get(job.pinned_backend, "ineligible")
            raise PinnedBackendIneligible(
                f"Backend {job.pinned_backend!r} cannot run this job: {why}.", rejected=rejected
            )
        detail = "; ".join(f"{n}: {r}" for n, r in sorted(rejected.items())) or "no backends registered"
        raise NoEligibleBackend(f"No eligible backend for this job ({detail}).", rejected=rejected)
    strategy = get_strategy(policy.strategy)
    ranked = strategy.rank(job, eligible, stats, policy.params)
    if not ranked:
        raise NoEligibleBackend(f"Policy {policy.name!r} ranked no backend for this job.", rejected=rejected)
    chosen = ranked[0]
    return Decision(
        policy=policy.name,
        policy_version=policy.version,
        backend=chosen.name,
        candidates=[{"backend": r.name, "score": r.score, "reason": r.reason} for r in ranked],
        rejected=rejected,
        reason=chosen.reason,
        job={k: v for k, v in asdict(job).items() if k != "key"},
    )
