"""Which backends may run a job at all, before any strategy ranks them (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from routing.strategies import BackendStats, Candidate, JobFacts

NOT_ALLOWED = "not among the tenant's allowed backends"


def reject_reason(job: JobFacts, c: Candidate, stats: BackendStats | None) -> str | None:
    """Why ``c`` cannot run ``job``, or None when it can."""
    if job.allowed_backends and c.name not in job.allowed_backends:
        return NOT_ALLOWED
    if not c.enabled:
        return "disabled"
    if c.drained:
        return "draining"
    if stats is not None and stats.circuit_open:
        return "circuit open"
    if job.needs_multimodal and not c.supports_multimodal:
        return "no multimodal support"
    if job.model and c.model and job.model != c.model:
        return f"serves model {c.model!r}, job asks for {job.model!r}"
    needed = job.prompt_tokens + job.max_tokens
    if needed > c.max_context_tokens:
        return f"context {c.max_context_tokens} tokens < {needed} needed"
    return None


def split_eligible(
    job: JobFacts, candidates: Sequence[Candidate], stats: Mapping[str, BackendStats]
) -> tuple[list[Candidate], dict[str, str]]:
    eligible: list[Candidate] = []
    rejected: dict[str, str] = {}
    for c in candidates:
        reason = reject_reason(job, c, stats.get(c.name))
        if reason is None:
            eligible.append(c)
        else:
            rejected[c.name] = reason
    return eligible, rejected
