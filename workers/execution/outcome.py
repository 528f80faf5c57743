"""The outcome of one backend call, the same for both runtimes: what an error means, what the
call does to its backend's live figures and breaker, and how the job's row ends (succeeded,
failed, or errored with a traceback).

A permanent error (bad input, a 4xx) is the request's fault, not the backend's health: it fails
the job at once and counts as a healthy call for routing's figures and the circuit breaker. A
retryable one counts against the backend and is the job run's to retry or fall back from.

Writes go through the caller's ``write`` (``fn(*args, **kwargs)``): a job thread's group commit
(``workers.runtime.job_threads``) or a plain call.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from jobs.models import AttemptOutcome, Job
from orchestrator_site.redis import RoundTrip
from routing import capacity, circuit, stats
from routing.models import Backend
from workers.backends.base import BackendError

log = logging.getLogger(__name__)

Write = Callable[..., Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def direct(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A ``write`` that writes now, in the caller's thread and transaction."""
    return fn(*args, **kwargs)


def describe(exc: BackendError) -> str:
    """The error as the job's attempt and error field say it, with the HTTP status when there was one."""
    return f"{exc.message} (HTTP {exc.status})" if exc.status else exc.message


def is_request_fault(exc: BackendError) -> bool:
    """A permanent error is the request's fault: retrying or another backend would fail the same way."""
    return not exc.retryable


def record_call_in(
    rt: RoundTrip, backend: Backend, latency_ms: float, *, ok: bool, error: str = "", lease: str | None = None
) -> None:
    """One call's figures for routing (``routing.stats``), its breaker and (``lease``) its slot back,
    queued on ``rt``."""
    stats.record_call_in(rt, backend.name, latency_ms=latency_ms, ok=ok, error=error)
    circuit.record_in(rt, backend.name, ok=ok, config=circuit.CircuitConfig.from_config(backend.config), error=error)
    if lease is not None:
        capacity.release_in(rt, lease)


def send(rt: RoundTrip) -> None:
    """Execute ``rt``. A Redis hiccup must not change a job's outcome: the figures are lost with a
    warning (a slot's lease then expires by itself)."""
    try:
        rt.execute()
    except RedisError as exc:
        log.warning("call outcome not recorded (figures, breaker, slot)", extra={"error": str(exc)})


def record_call(
    backend: Backend,
    latency_ms: float,
    *,
    ok: bool,
    error: str = "",
    lease: str | None = None,
    client: Redis | None = None,
) -> None:
    """``record_call_in`` in one round trip of its own."""
    rt = RoundTrip(client)
    record_call_in(rt, backend, latency_ms, ok=ok, error=error, lease=lease)
    send(rt)


def fail_for_request(
    write: Write,
    job: Job,
    backend: Backend,
    exc: BackendError,
    latency_ms: int,
    *,
    lease: str | None = None,
    log_extra: dict[str, Any] | None = None,
) -> None:
    """A permanent error: a healthy call for the backend's figures, and the job fails with its message."""
    record_call(backend, latency_ms, ok=True, error=describe(exc), lease=lease)
    write(job.mark_failed, f"{backend.name}: {describe(exc)}", latency_ms=latency_ms)
    extra = log_extra if log_extra is not None else {"job_id": str(job.pk), "backend": backend.name}
    log.info("job failed (permanent error)", extra={**extra, "error": exc.message})


def crash(write: Write, job: Job, backend_name: str, exc_info: ExcInfo, *, latency_ms: int | None = None) -> None:
    """Code broke (an adapter's bug, or ours): the job ends ``failed`` with the attempt ``errored``
    and the traceback on the row (RQ keeps nothing for our tasks)."""
    kind, exc, _ = exc_info
    fields: dict[str, Any] = {
        "outcome": AttemptOutcome.ERRORED,
        "traceback": "".join(traceback.format_exception(*exc_info)),
    }
    if latency_ms is not None:
        fields["latency_ms"] = latency_ms
    write(job.mark_failed, f"{backend_name}: unexpected {kind.__name__}: {exc}", **fields)


def log_success(won: bool, extra: dict[str, Any]) -> None:
    """A result written, or discarded because the job stopped being ours (canceled, re-queued)."""
    log.info("job succeeded" if won else "result discarded (job no longer running)", extra=extra)
