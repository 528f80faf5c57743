"""The routing decision: the active policy ranks the eligible backends for one job."""

from __future__ import annotations

from dataclasses import dataclass

from routing.eligibility import split_eligible
from routing.registry import Snapshot
from routing.strategies import JobFacts, get_strategy


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

    def as_json(self) -> dict:
        return {
            "policy": self.policy,
            "policy_version": self.policy_version,
            "backend": self.backend,
            "reason": self.reason,
            "candidates": self.candidates,
            "rejected": self.rejected,
        }


def route(job: JobFacts, snap: Snapshot) -> Decision:
    """Pick a backend for ``job`` under the active policy in ``snap``; raises RoutingError."""
    policy = snap.policy
    if policy is None:
        raise NoActivePolicy("No routing policy is active; activate one in the admin or POST /policies/<id>/activate.")
    stats: dict = {}  # live backend figures arrive with the workers' reports (routing issue)
    candidates = snap.candidates
    if job.pinned_backend:
        candidates = tuple(c for c in candidates if c.name == job.pinned_backend)
        if not candidates:
            raise UnknownBackend(f"No backend named {job.pinned_backend!r} is registered.")
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
    )
