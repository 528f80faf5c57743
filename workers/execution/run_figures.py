"""The figures of a finished run, recorded where the run ends (both runtimes call ``record_run``).

One run (one delivery of a job to a worker) adds to the fleet metrics that ``/metrics`` exports
(``orchestrator_site.metrics``), to the dashboard's per-minute aggregates (``dashboard.aggregates``)
and, with tracing on, to the run's span (one child span per attempt). All of it is read back from
the rows (``workers.execution.run_facts``), so it stays right whatever the run did inside, and is
buffered: a worker passes its write-behind buffer as ``pipe``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from dashboard import aggregates
from orchestrator_site import tracing
from orchestrator_site.metrics import (
    BACKEND_ATTEMPTS,
    BACKEND_CALL,
    BACKEND_ERRORS,
    COST,
    EXECUTION,
    JOB_LATENCY,
    JOBS_FINISHED,
    NO_TENANT,
    QUEUE_WAIT,
    TOKENS,
    inc,
    observe,
)
from orchestrator_site.redis import redis_client
from workers.execution.run_facts import RunFacts, read_run

log = logging.getLogger(__name__)


def record_run(job_id: str, queue: str, since: datetime, span: Any = None, row: Any = None, pipe: Any = None) -> None:
    """Fleet metrics, dashboard figures (and attempt spans under ``span``) for what one run of ``job_id`` did.

    Call it once per run after its outcome is written, with ``since`` taken before the job was
    claimed. ``row``: the Job instance the run finished with, when there is one (its fields and
    attempts are current: nothing is read). ``pipe``: buffer the figures there (a worker's
    ``WriteBehind``) instead of sending them now. Never raises: observability must not fail a job.
    """
    try:
        run = read_run(job_id, queue, since, row=row)
        if run is not None:
            record_fleet_figures(run, pipe=pipe)
            tracing.add_attempt_spans(span, run)
    except Exception as exc:
        log.warning("job metrics not recorded", extra={"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"})


def record_fleet_figures(run: RunFacts, pipe: Any = None) -> None:
    """Fold one finished RQ execution into the fleet figures: one pipeline, one round trip.

    With ``pipe`` (anything with the pipeline's ``hincrby``/``hincrbyfloat``/``expire``, such as
    the worker's write-behind buffer) the commands are only queued there. A duplicate delivery
    that lost the claim started no attempt and records nothing.
    """
    if not run.attempts:
        return
    own = pipe is None
    if own:
        pipe = redis_client().pipeline(transaction=False)
    for a in run.attempts:
        if a.outcome == "running":  # still open: re-queued for a retry by the task, counted when it ends
            continue
        inc(pipe, BACKEND_ATTEMPTS, a.backend, a.outcome)
        if a.outcome in ("failed", "errored"):
            inc(pipe, BACKEND_ERRORS, a.backend)
        if a.latency_s is None and a.finished_at is not None:
            observe(pipe, BACKEND_CALL, (a.finished_at - a.started_at).total_seconds(), a.backend, a.outcome)
        elif a.latency_s is not None:
            observe(pipe, BACKEND_CALL, a.latency_s, a.backend, a.outcome)
    if run.started_at and run.enqueued_at:
        observe(pipe, QUEUE_WAIT, (run.started_at - run.enqueued_at).total_seconds(), run.queue)
    if run.finished_in_run:
        inc(pipe, JOBS_FINISHED, run.backend, run.state)
        if run.enqueued_at:
            observe(pipe, JOB_LATENCY, (run.finished_at - run.enqueued_at).total_seconds(), run.backend, run.state)
        if run.started_at:
            observe(pipe, EXECUTION, (run.finished_at - run.started_at).total_seconds(), run.backend, run.state)
        tenant = run.tenant or NO_TENANT
        if run.prompt_tokens:
            inc(pipe, TOKENS, run.backend, "prompt", tenant, amount=int(run.prompt_tokens))
        if run.completion_tokens:
            inc(pipe, TOKENS, run.backend, "completion", tenant, amount=int(run.completion_tokens))
        if run.cost:
            inc(pipe, COST, run.backend, tenant, amount=float(run.cost))
    aggregates.record(pipe, run)  # the live dashboard's per-minute figures; never raises
    if own:
        pipe.execute()


def record_expired(jobs: Sequence[Any]) -> None:
    """Jobs that ended ``expired`` (never run): their final state in the fleet metrics and the dashboard."""
    if not jobs:
        return
    try:
        pipe = redis_client().pipeline(transaction=False)
        for job in jobs:
            backend = job.backend_name or aggregates.NO_BACKEND
            inc(pipe, JOBS_FINISHED, backend, "expired")
            if job.enqueued_at and job.finished_at:
                observe(pipe, JOB_LATENCY, (job.finished_at - job.enqueued_at).total_seconds(), backend, "expired")
            aggregates.count_final(pipe, backend, "expired", job.finished_at)
        pipe.execute()
    except Exception as exc:
        log.warning("expired jobs' figures not recorded", extra={"jobs": len(jobs), "error": repr(exc)})
