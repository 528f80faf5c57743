"""Dry-run a policy over recent finished jobs: which backend would each have gone to, at what cost.

Read-only: it reads job rows and the live stats, routes each job with the policy under test
(active or not) against today's registry, and writes nothing. A job is replayed with the facts
routing saw when it was submitted (stored in ``Job.routing["job"]``), or, for older rows,
facts rebuilt from the row. ``weighted`` draws are keyed by the job id, so a replay is stable.
The live stats are read once and applied to every job: the replay answers "where would this
traffic go now", not "what would have happened then".
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from jobs.models import Job, JobState
from routing.models import Backend, RoutingPolicy
from routing.registry import PolicySnapshot, Snapshot, to_candidate
from routing.services import RoutingError, read_live_stats, route
from routing.strategies import BackendStats, JobFacts

DEFAULT_JOBS = 200
MAX_JOBS = 5000
DEFAULT_OUTPUT_TOKENS = 256  # when a job has neither completion_tokens nor max_tokens
UNROUTABLE = "(no backend)"


@dataclass
class Replayed:
    job_id: str
    finished_at: Any
    actual: str
    simulated: str
    reason: str
    actual_cost: Decimal | None
    est_cost: Decimal | None
    actual_latency_ms: int | None
    est_latency_ms: float | None

    @property
    def changed(self) -> bool:
        return self.actual != self.simulated


@dataclass
class Share:
    backend: str
    actual: int
    simulated: int
    actual_pct: float
    simulated_pct: float
    est_latency_ms: float | None


@dataclass
class Simulation:
    policy: RoutingPolicy
    jobs: list[Replayed]
    shares: list[Share]
    stats: dict[str, BackendStats]
    totals: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> list[Replayed]:
        return [j for j in self.jobs if j.changed]


def facts_for(job: Job) -> JobFacts:
    """The facts routing saw for ``job`` (stored with the decision), else rebuilt from the row."""
    seen = (job.routing or {}).get("job")
    if isinstance(seen, dict):
        known = {k: v for k, v in seen.items() if k in JobFacts.__dataclass_fields__}
        if "allowed_backends" in known:  # stored as a JSON list
            known["allowed_backends"] = tuple(known["allowed_backends"] or ())
        return JobFacts(**{**known, "key": str(job.pk)})
    from jobs.services import estimate_tokens

    text = job.prompt or "".join(str(m.get("content", "")) for m in job.messages or [])
    return JobFacts(
        priority=job.priority,
        has_images=bool(job.image_count),
        requires_multimodal=job.requires_multimodal,
        model="",  # the row stores the backend's model when the job named none: not a constraint we can trust
        pinned_backend=job.requested_backend,
        prompt_tokens=job.prompt_tokens or estimate_tokens(text),
        max_tokens=job.max_tokens or 0,
        key=str(job.pk),
    )


def recent_jobs(limit: int) -> list[Job]:
    return list(
        Job.objects.filter(state__in=[JobState.SUCCEEDED, JobState.FAILED], finished_at__isnull=False)
        .order_by("-finished_at")
        .only(
            "id",
            "priority",
            "prompt",
            "messages",
            "image_count",
            "requires_multimodal",
            "model",
            "requested_backend",
            "max_tokens",
            "prompt_tokens",
            "completion_tokens",
            "backend_name",
            "latency_ms",
            "cost",
            "state",
            "routing",
            "finished_at",
        )[:limit]
    )


def simulate(policy: RoutingPolicy, *, limit: int = DEFAULT_JOBS, stats: dict[str, BackendStats] | None = None):
    """Replay ``policy`` over the last ``limit`` finished jobs; returns a :class:`Simulation`."""
    limit = max(1, min(limit, MAX_JOBS))
    backends = {b.name: b for b in Backend.objects.all()}
    snap = Snapshot(
        token="simulation",
        policy=PolicySnapshot(policy.pk, policy.name, policy.strategy, dict(policy.params), policy.version),
        candidates=tuple(to_candidate(b) for b in backends.values()),
        backends=backends,
    )
    if stats is None:
        stats = read_live_stats(list(backends))
    jobs = recent_jobs(limit)
    observed = _observed_latency(jobs)

    def latency_of(name: str) -> float | None:
        s = stats.get(name)
        if s is not None and s.ewma_latency_ms is not None:
            return s.ewma_latency_ms
        return observed.get(name)

    replayed: list[Replayed] = []
    for job in jobs:
        facts = facts_for(job)
        try:
            decision = route(facts, snap, stats)
            simulated, reason = decision.backend, decision.reason
        except RoutingError as exc:
            simulated, reason = UNROUTABLE, exc.message
        prompt = job.prompt_tokens if job.prompt_tokens is not None else facts.prompt_tokens
        completion = (
            job.completion_tokens if job.completion_tokens is not None else (job.max_tokens or DEFAULT_OUTPUT_TOKENS)
        )
        chosen = backends.get(simulated)
        actual_backend = backends.get(job.backend_name)
        replayed.append(
            Replayed(
                job_id=str(job.pk),
                finished_at=job.finished_at,
                actual=job.backend_name or "(none)",
                simulated=simulated,
                reason=reason,
                actual_cost=job.cost
                if job.cost is not None
                else (actual_backend.cost_for(prompt, completion) if actual_backend else None),
                est_cost=chosen.cost_for(prompt, completion) if chosen else None,
                actual_latency_ms=job.latency_ms,
                est_latency_ms=latency_of(simulated) if chosen else None,
            )
        )
    sim = Simulation(policy=policy, jobs=replayed, shares=_shares(replayed, latency_of), stats=stats)
    sim.totals = _totals(replayed)
    return sim


def _observed_latency(jobs: list[Job]) -> dict[str, float]:
    by_backend: dict[str, list[int]] = {}
    for j in jobs:
        if j.latency_ms is not None and j.state == JobState.SUCCEEDED:
            by_backend.setdefault(j.backend_name, []).append(j.latency_ms)
    return {name: statistics.fmean(v) for name, v in by_backend.items()}


def _shares(replayed: list[Replayed], latency_of) -> list[Share]:
    n = len(replayed) or 1
    actual = Counter(j.actual for j in replayed)
    simulated = Counter(j.simulated for j in replayed)
    names = sorted(set(actual) | set(simulated), key=lambda b: (-simulated[b], -actual[b], b))
    return [
        Share(b, actual[b], simulated[b], 100 * actual[b] / n, 100 * simulated[b] / n, latency_of(b)) for b in names
    ]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _totals(replayed: list[Replayed]) -> dict[str, Any]:
    return {
        "jobs": len(replayed),
        "changed": sum(j.changed for j in replayed),
        "unroutable": sum(j.simulated == UNROUTABLE for j in replayed),
        "actual_cost": sum((j.actual_cost for j in replayed if j.actual_cost is not None), Decimal(0)),
        "est_cost": sum((j.est_cost for j in replayed if j.est_cost is not None), Decimal(0)),
        "actual_latency_ms": _mean([j.actual_latency_ms for j in replayed if j.actual_latency_ms is not None]),
        "est_latency_ms": _mean([j.est_latency_ms for j in replayed if j.est_latency_ms is not None]),
    }
