"""The RQ task: load the row, claim it, run the adapter, record the outcome.

The RQ job carries only the job id. A duplicate delivery or a job canceled while
queued loses the compare-and-set in ``mark_running`` and does nothing; a result that
arrives after a cancel loses the CAS in ``mark_succeeded`` and is discarded.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback

from django.db import close_old_connections
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from jobs.models import AttemptOutcome, Job
from routing import stats
from workers.backends import get_adapter
from workers.backends.base import BackendConfig, BackendError, GenerationRequest

log = logging.getLogger(__name__)


def worker_name() -> str:
    rq_job = get_current_job()
    name = getattr(rq_job, "worker_name", None) if rq_job is not None else None
    return name or f"{socket.gethostname()}:{os.getpid()}"


def run_job(job_id: str) -> str:
    close_old_connections()
    try:
        job = Job.objects.select_related("backend").get(pk=job_id)
    except Job.DoesNotExist:
        log.warning("job row missing; dropping queue entry", extra={"job_id": job_id})
        return "missing"
    if not job.mark_running(worker_name()):
        log.info("job not claimable; skipped", extra={"job_id": job_id, "state": job.state})
        return f"skipped:{job.state}"
    ctx = {"job_id": job_id, "backend": job.backend_name, "policy": job.policy_name, "attempt": job.attempt_count}
    backend = job.backend
    if backend is None:
        job.mark_failed(f"Backend {job.backend_name!r} was deleted before the job ran.")
        return job.state
    request = GenerationRequest(
        job_id=job_id,
        messages=job.chat_messages(),
        images=list(job.images),
        model=job.model,
        max_tokens=job.max_tokens,
        temperature=job.temperature,
        params=dict(job.params),
        timeout_s=float(job.timeout_s),
        attempt=job.attempt_count,
    )
    config = BackendConfig(
        name=backend.name,
        kind=backend.kind,
        base_url=backend.base_url,
        model=backend.model,
        api_key=backend.api_key,
        timeout_s=float(backend.timeout_s),
        config=dict(backend.config),
    )
    log.info("job started", extra=ctx)
    started = time.monotonic()
    try:
        # The lease outlives the job's own deadline, so a SIGKILLed worker's call stops counting.
        with stats.in_flight(backend.name, lease_s=job.timeout_s + 60):
            result = get_adapter(backend.kind).generate(config, request)
    except BackendError as exc:
        status = f" (HTTP {exc.status})" if exc.status else ""
        # A permanent error (bad input, 4xx) is the request's fault, not the backend's health.
        _record(backend.name, started, ok=not exc.retryable, error=f"{exc.message}{status}")
        job.mark_failed(f"{backend.name}: {exc.message}{status}")
        log.info("job failed", extra={**ctx, "error": exc.message, "retryable": exc.retryable})
    except JobTimeoutException:
        _record(backend.name, started, ok=False, error=f"timed out after {job.timeout_s}s")
        job.mark_failed(f"{backend.name}: timed out after {job.timeout_s}s")
        log.info("job timed out", extra=ctx)
    except Exception as exc:  # a bug in an adapter must not kill the worker or loop forever
        _record(backend.name, started, ok=False, error=f"unexpected {type(exc).__name__}: {exc}")
        job.mark_failed(
            f"{backend.name}: unexpected {type(exc).__name__}: {exc}",
            outcome=AttemptOutcome.ERRORED,
            traceback=traceback.format_exc(),
        )
        log.exception("job errored", extra=ctx)
    else:
        _record(backend.name, started, ok=True)
        won = job.mark_succeeded(
            output=result.output,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            latency_ms=result.latency_ms,
            cost=backend.cost_for(result.prompt_tokens, result.completion_tokens),
        )
        log.info(
            "job succeeded" if won else "result discarded (job no longer running)",
            extra={**ctx, "latency_ms": result.latency_ms},
        )
    return job.state


def _record(backend_name: str, started: float, *, ok: bool, error: str = "") -> None:
    """Feed the live figures routing reads; a Redis hiccup must not change the job's outcome."""
    try:
        stats.record_call(backend_name, latency_ms=(time.monotonic() - started) * 1000, ok=ok, error=error)
    except RedisError as exc:
        log.warning("backend stats not recorded", extra={"backend": backend_name, "error": str(exc)})
