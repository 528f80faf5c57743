"""What one run of a job did, read back from its rows once the run ends: the facts the fleet
metrics, the dashboard's aggregates and the attempt spans are made of (``workers.execution.run_figures``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from jobs.models import Job, JobAttempt, JobState


@dataclass(frozen=True)
class AttemptFacts:
    number: int
    backend: str
    outcome: str
    error: str
    latency_s: float | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class RunFacts:
    """What one RQ execution of a job did, read back from the rows after the task returned.

    Read from the database (the system of record) rather than reported by the task, so metrics
    and spans stay right whatever the task's retry/fallback logic does inside.
    """

    job_id: str
    queue: str
    state: str
    backend: str
    policy: str
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost: Decimal | None
    attempts: list[AttemptFacts] = field(default_factory=list)
    tenant: str = ""  # the job's tenant's name ('' for none)

    @property
    def finished_in_run(self) -> bool:
        return self.finished_at is not None and bool(self.attempts) and self.state in TERMINAL


TERMINAL = frozenset({"succeeded", "failed", "canceled"})


def read_run(job_id: str, queue: str, since: datetime, row: Any = None) -> RunFacts | None:
    """The job row and the attempts this run started (``started_at >= since``): two PK-indexed reads.

    With ``row`` (the worker's own Job instance, kept current by its fenced transitions) nothing is
    read when it holds its attempts in memory.
    """
    if row is not None and row.state != JobState.RUNNING and row._known_attempts is not None:
        return RunFacts(
            job_id=str(job_id),
            queue=queue,
            state=row.state,
            backend=row.backend_name,
            policy=row.policy_name,
            enqueued_at=row.enqueued_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cost=row.cost,
            tenant=row.tenant_name,
            attempts=[
                AttemptFacts(
                    number=a.number,
                    backend=a.backend_name,
                    outcome=a.outcome,
                    error=a.error,
                    latency_s=a.latency_ms / 1000 if a.latency_ms is not None else None,
                    started_at=a.started_at,
                    finished_at=a.finished_at,
                )
                for a in row.attempt_rows()
                if a.started_at >= since
            ],
        )
    row = (
        Job.objects.filter(pk=job_id)
        .values(
            "state",
            "backend_name",
            "policy_name",
            "enqueued_at",
            "started_at",
            "finished_at",
            "prompt_tokens",
            "completion_tokens",
            "cost",
            "tenant_name",
        )
        .first()
    )
    if row is None:
        return None
    attempts = [
        AttemptFacts(
            number=a["number"],
            backend=a["backend_name"],
            outcome=a["outcome"],
            error=a["error"],
            latency_s=a["latency_ms"] / 1000 if a["latency_ms"] is not None else None,
            started_at=a["started_at"],
            finished_at=a["finished_at"],
        )
        for a in JobAttempt.objects.filter(job_id=job_id, started_at__gte=since)
        .order_by("number")
        .values("number", "backend_name", "outcome", "error", "latency_ms", "started_at", "finished_at")
    ]
    return RunFacts(
        job_id=str(job_id),
        queue=queue,
        state=row["state"],
        backend=row["backend_name"],
        policy=row["policy_name"],
        enqueued_at=row["enqueued_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        cost=row["cost"],
        attempts=attempts,
        tenant=row["tenant_name"],
    )
