"""The run of one job: its backends in order (retrying, then falling back), under one deadline.

``JobRun`` gets what it needs from its caller in a ``RunContext``: the worker's name, the cancel
event the worker sets, and the writer its database writes go through (a job thread's group
commit, or a plain call). Outcomes are written through ``workers.execution.outcome``.

The RQ job carries only the job id. A duplicate delivery or a job canceled while
queued loses the compare-and-set in ``mark_running`` and does nothing; a result that
arrives after a cancel loses the CAS in ``mark_succeeded`` and is discarded.

Failure handling, all inside one run and under one deadline (``job.timeout_s`` caps every
attempt and every sleep together):

- a retryable ``BackendError`` (timeout, connection, 429, 5xx, truncated answer) is retried on
  the same backend after a jittered backoff (``workers.execution.retry``) that never undercuts the
  server's ``Retry-After``, up to the backend's ``retry_max``;
- then the run falls back to the next backend the policy ranked (``job.routing["candidates"]``)
  that is still usable now: enabled, not drained, its circuit allowing a call, and runnable
  in this worker (a pooled kind only on its own pool's queue);
- a permanent error (4xx, bad input) fails the job at once with the backend's message;
- every call is its own ``JobAttempt`` (backend, error, latency) and feeds both the live
  figures routing reads (``routing.stats``) and the shared circuit breaker (``routing.circuit``);
- every call holds one of its backend's ``max_concurrency`` slots (``routing.capacity``, shared by
  all workers). A backend with no free slot is passed over for the next candidate; when every
  usable candidate is full, the job waits for the first slot to free on any of them, best-ranked
  first, until its deadline;
- a cancel (``RunContext.cancel``, set by the worker when the job is canceled while running or
  abandoned past its deadline) stops the backoff and any adapter that can stop early;
- a job submitted with ``stream`` has every call's output published to its delta stream
  (``jobs.deltas``) as it comes: a call after one that sent output resets it first, and the run ends
  it with the job's final state once that is committed;
- a ``response_format`` asking for JSON is checked on the final output
  (``workers.execution.structured``): a violation is a permanent error.

``run_job`` is the RQ task that ``jobs.queueing`` enqueues. Our workers run it without importing it
(``workers.runtime.base``): the RQ job carries only the job id, and any other RQ worker calls it.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from django.db import close_old_connections
from django.utils import timezone
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from jobs import deltas
from jobs.models import TERMINAL_STATES, TEXT_MAX, AttemptOutcome, Job, JobState, storable
from orchestrator_site.redis import RoundTrip
from routing import capacity, circuit
from routing.models import POOLED_KINDS, Backend
from workers.backends import get_adapter
from workers.backends.base import BackendError, JobCanceled
from workers.execution import outcome, structured
from workers.execution.request import generation_request, success_fields
from workers.execution.retry import Deadline, RetryPolicy

log = logging.getLogger(__name__)
T = TypeVar("T")

# Leave at least this much of the deadline for a call; less is not worth starting.
MIN_CALL_S = 0.05
# How often a job waiting for a backend slot asks again (plus up to as much jitter).
SLOT_POLL_S = 0.02


class Writer(Protocol):
    """Where a run's database writes go; each call returns once its write is committed, except a
    ``run_batched`` with ``then`` that the writer may defer (it returns None, ``then`` runs later)."""

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    def run_batched(
        self, fn: Callable[[list[Any]], list[T]], item: Any, *, then: Callable[[T], None] | None = None
    ) -> T | None: ...


class DirectWriter:
    """Writes in the caller's thread and transaction, at once."""

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)

    def run_batched(
        self, fn: Callable[[list[Any]], list[T]], item: Any, *, then: Callable[[T], None] | None = None
    ) -> T | None:
        value = fn([item])[0]
        if then is not None:
            then(value)
        return value


@dataclass(frozen=True)
class RunContext:
    """What a job run gets from the worker running it."""

    worker: str
    writer: Writer = field(default_factory=DirectWriter)
    # Set by the worker when the job is canceled while running or abandoned past its deadline.
    cancel: threading.Event = field(default_factory=threading.Event)


def run_job(job_id: str) -> str:
    """The RQ task (``jobs.queueing.TASK``) as any RQ worker runs it: load the row, claim it, run it."""
    close_old_connections()
    try:
        job = Job.objects.select_related("backend").get(pk=job_id)
    except Job.DoesNotExist:
        log.warning("job row missing; dropping queue entry", extra={"job_id": job_id})
        return "missing"
    rq_job = get_current_job()
    worker = getattr(rq_job, "worker_name", None) if rq_job is not None else None
    ctx = RunContext(worker or f"{socket.gethostname()}:{os.getpid()}")
    if not job.mark_running(ctx.worker):
        log.info("job not claimable; skipped", extra={"job_id": job_id, "state": job.state})
        return f"skipped:{job.state}"
    try:
        return run_claimed(job, ctx)
    finally:
        deltas.drain()  # a forking worker's work horse exits with os._exit: nothing buffered may wait


def run_claimed(job: Job, ctx: RunContext) -> str:
    """Run ``job``, already claimed by ``ctx.worker`` (``running``, its attempt open); returns its final state.

    Our workers claim the jobs they pop in one batch (``Job.claim``) and hand each here;
    ``run_job`` claims one by itself.
    """
    close_old_connections()
    return JobRun(job, ctx, Deadline(float(job.timeout_s))).run()


class _Finished(Exception):
    """The job reached its final state (or stopped being ours); stop trying."""


@dataclass
class JobRun:
    """One delivery of a job: the backends to try, in order, under one deadline."""

    job: Job
    ctx: RunContext
    deadline: Deadline
    calls: int = 0
    tried: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    last_error: str = ""
    # Set when a retry was given up for lack of time: then the deadline, not the budget, ended the run.
    out_of_time: bool = False
    # The claim (mark_running, Job.claim) opened attempt #n before we knew whether its backend would take a call.
    attempt_unused: bool = True
    # The first call waited for a backend slot: its attempt starts when the call does, not at the claim.
    waited_for_slot: bool = False
    lease: str | None = None  # the backend slot the current call holds
    stream: deltas.JobStream | None = None  # the job's delta stream, from the run's start
    # A success was handed to the writer: its callback ends the stream once it is committed.
    success_handed_over: bool = False

    @property
    def cancel(self) -> threading.Event:
        return self.ctx.cancel

    def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.ctx.writer.run(fn, *args, **kwargs)

    def resume_after(self, backend: Backend, error: str, started: float) -> str:
        """Go on from a call made outside this run (a GPU batch's) that failed with ``error``:
        close its attempt, count it, then retry and fall back as usual; returns the final state."""
        self.close_attempt(error, started)
        self.attempt_unused = False
        self.calls, self.last_error = 1, error
        self.tried.append(backend.name)
        return self.run()

    def run(self) -> str:
        if self.stream is None and self.job.stream:
            self.stream = deltas.JobStream(self.job.pk, self.job.attempt_count)
        try:
            full: list[Backend] = []  # usable, but every slot was taken when its turn came
            for index, name in enumerate(self.plan()):
                if self.deadline.remaining() < MIN_CALL_S:
                    break
                backend = self.job.backend if index == 0 else Backend.objects.filter(name=name).first()
                why = self.unusable(backend, first=index == 0)
                if why:
                    self.skipped[name] = why
                    continue
                if not self.run_on(backend):
                    full.append(backend)
                    self.waited_for_slot = True
            self.wait_for_slots(full)
            self.fail_exhausted()
        except _Finished:
            pass
        if self.stream is not None and not self.success_handed_over:
            self.end_stream()
        return self.job.state

    def end_stream(self) -> None:
        """The stream's end event, once the job's final state is committed (not when it is not final:
        handed back to its queue, it runs again and that run resets the stream)."""
        job = self.job
        if job.state not in TERMINAL_STATES:
            # Stopped by another process (a cancel, the watchdog): the row knows how it ended.
            job.refresh_from_db(
                fields=["state", "version", "error", "finish_reason", "prompt_tokens", "completion_tokens"]
            )
            if job.state not in TERMINAL_STATES:
                return
        assert self.stream is not None
        self.stream.end(job.state, job.finish_reason, job.usage, job.error)

    def wait_for_slots(self, full: list[Backend]) -> None:
        """Every free candidate was tried: take the first slot that frees on the full ones (best-ranked first)."""
        while full and self.deadline.remaining() >= MIN_CALL_S:
            if self.cancel.wait(SLOT_POLL_S * (1 + random.random())):
                raise _Finished  # canceled (or abandoned) while waiting
            for backend in list(full):
                if self.run_on(backend):
                    full.remove(backend)
        for backend in full:
            self.skipped[backend.name] = f"all {backend.max_concurrency} slots busy until the deadline"

    def plan(self) -> list[str]:
        """The routed backend first, then the rest of the policy's ranking, each once."""
        names = [self.job.backend_name]
        for c in (self.job.routing or {}).get("candidates") or []:
            name = c.get("backend") if isinstance(c, dict) else None
            if name and name not in names:
                names.append(name)
        return names

    def unusable(self, backend: Backend | None, *, first: bool) -> str | None:
        """Why this worker must not call ``backend`` for this job now (the registry is reread per fallback)."""
        if backend is None:
            return "deleted"
        if not backend.enabled:
            return "disabled"
        # A drained backend finishes what was queued for it, but takes no one else's job.
        if backend.drain and not first:
            return "draining"
        if backend.kind in POOLED_KINDS and backend.queue_for(self.job.priority) != self.job.queue:
            return f"runs only in pool {backend.pool!r} workers"
        try:
            get_adapter(backend.kind)
        except BackendError:
            return f"no {backend.kind} adapter in this worker"
        return None

    # --- one backend: tries with backoff ---------------------------------------------------------
    def run_on(self, backend: Backend) -> bool:
        """Call ``backend`` up to its budget; raises _Finished when the job is done.

        Returns False when its first call found every slot taken (nothing was tried: the caller
        may come back), True when it tried and the run should fall back.
        """
        policy = RetryPolicy.from_config(backend.config)
        retry_after: float | None = None
        self.out_of_time = False  # about the last backend tried: an earlier one's Retry-After is not the story
        for n in range(policy.retries + 1):
            if n:
                wait = policy.delay_s(n, retry_after)
                if not self.deadline.allows_wait(wait, min_call_s=MIN_CALL_S):
                    self.out_of_time = True
                    log.info("no time left to retry here", extra={**self.log_extra(backend), "wait_s": round(wait, 3)})
                    return True
                if self.cancel.wait(wait):
                    raise _Finished
            lease, allowed = self.open_call(backend, wait=n > 0)
            if lease is None:
                return n > 0
            self.lease = lease
            try:
                if not allowed:
                    if n == 0:
                        self.skipped[backend.name] = "circuit open"
                    return True
                self.begin_attempt(backend)
                exc = self.call(backend)
            finally:
                capacity.release(lease)  # a no-op when _record gave it back with the call's figures
                self.lease = None
            retry_after = exc.retry_after_s
            if self.deadline.remaining() < MIN_CALL_S:
                return True
        return True

    def open_call(self, backend: Backend, *, wait: bool) -> tuple[str | None, bool]:
        """Take one of ``backend``'s slots and ask its breaker, in one round trip: (lease, allowed).

        No lease when every slot is taken (a half-open trial the breaker granted meanwhile is handed
        back); with ``wait`` (a retry here), poll until the deadline. If Redis cannot answer, the
        call goes ahead anyway (losing Redis must not stop work).
        """
        owner = str(self.job.pk)
        while True:
            rt = RoundTrip()
            lease, taken = capacity.acquire_in(rt, backend.name, backend.max_concurrency, owner=owner)
            asked = circuit.allow_in(rt, backend.name, trial_lease_s=self.deadline.remaining() + 30)
            error = None
            try:
                rt.execute()
            except RedisError as exc:
                error = exc
            if taken.value is None:  # Redis did not answer
                lease = capacity.hold_anyway(lease, backend.name, owner, error or RedisError("no reply"))
            elif not taken.value:
                if asked.value is not None and asked.value[2]:
                    self._return_trial(backend)
                lease = None
            if lease is not None:
                if asked.value is None:
                    extra = {**self.log_extra(backend), "error": str(error)}
                    log.warning("circuit unavailable; calling anyway", extra=extra)
                    return lease, True
                allowed, state, _trial = asked.value
                if not allowed:
                    log.info("circuit does not allow a call", extra={**self.log_extra(backend), "circuit": state})
                return lease, allowed
            if not wait:
                return None, False
            if self.deadline.remaining() < MIN_CALL_S + SLOT_POLL_S:
                self.out_of_time = True
                return None, False
            if self.cancel.wait(SLOT_POLL_S * (1 + random.random())):
                raise _Finished

    def _return_trial(self, backend: Backend) -> None:
        try:
            circuit.return_trial(backend.name)
        except RedisError as exc:  # the trial's lease runs out by itself
            log.warning("half-open trial not handed back", extra={**self.log_extra(backend), "error": str(exc)})

    def call(self, backend: Backend) -> BackendError:
        """One call; returns the retryable error, or raises _Finished when the job reached its end."""
        job = self.job
        self.calls += 1
        if backend.name not in self.tried:
            self.tried.append(backend.name)
        stream = self.stream
        if stream is not None:
            stream.begin_attempt(job.attempt_count)
        request = generation_request(job, self.deadline.remaining(), cancel=self.cancel, on_delta=stream)
        extra = self.log_extra(backend)
        log.info("attempt started", extra=extra)
        started = time.monotonic()
        try:
            result = get_adapter(backend.kind).generate(backend.adapter_config(), request)
            structured.check(request.response_format, result)
        except JobCanceled:
            # Canceled (the cancel closed the attempt) or abandoned past its deadline (failed by the
            # watchdog): either way the job's outcome is written and this call is not the backend's fault.
            log.info("call stopped: job canceled", extra=extra)
            raise _Finished from None
        except BackendError as exc:
            if outcome.is_request_fault(exc):
                outcome.fail_for_request(
                    self.write, job, backend, exc, _ms_since(started), lease=self.lease, log_extra=extra
                )
                raise _Finished from None
            error = f"{backend.name}: {outcome.describe(exc)}"
            self._record(backend, started, ok=False, error=outcome.describe(exc))
            self.last_error = error
            self.close_attempt(error, started)
            log.info("attempt failed (retryable)", extra={**extra, "error": exc.message})
            return exc
        except JobTimeoutException:
            self._record(backend, started, ok=False, error=f"timed out after {job.timeout_s}s")
            self.write(
                job.mark_failed, f"{backend.name}: timed out after {job.timeout_s}s", latency_ms=_ms_since(started)
            )
            log.info("job timed out", extra=extra)
            raise _Finished from None
        except Exception as exc:  # a bug in an adapter must not kill the worker or loop forever
            self._record(backend, started, ok=False, error=f"unexpected {type(exc).__name__}: {exc}")
            outcome.crash(self.write, job, backend.name, sys.exc_info(), latency_ms=_ms_since(started))
            log.exception("job errored", extra=extra)
            raise _Finished from None
        self._record(backend, started, ok=True)
        latency_ms = result.latency_ms

        def written(won: bool) -> None:
            outcome.log_success(won, {**extra, "latency_ms": latency_ms})
            if stream is None:
                return
            if won:
                usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens}
                stream.end(JobState.SUCCEEDED, result.finish_reason, usage)
            elif job.state in TERMINAL_STATES:  # canceled meanwhile (the loser's state is re-read)
                stream.end(job.state, job.finish_reason, job.usage, job.error)

        # The write may come a moment later (group commit): the result's time is now. In a worker's
        # job thread this returns before the commit: the slot is free for the next job.
        fields = success_fields(result, backend, finished_at=timezone.now())
        if stream is not None and not stream.flush():  # a relay that sees the success reads no further
            log.warning("last deltas not written before the outcome", extra=extra)
        self.success_handed_over = True
        self.ctx.writer.run_batched(Job.mark_succeeded_many, (job, fields), then=written)
        raise _Finished

    # --- attempts: race-safe rows while the job stays running ------------------------------------
    def begin_attempt(self, backend: Backend) -> None:
        """Open the attempt row for the next call on ``backend`` and point the job at it.

        The first call reuses the attempt ``mark_running`` opened (relabelled if a fallback takes
        it). The UPDATE is a compare-and-set on ``running``, so a job canceled during a backoff
        stops here; inside one transaction, a concurrent cancel waits for the row and then
        closes the attempt that now exists.
        """
        job = self.job
        if self.attempt_unused and backend.name == job.backend_name:
            self.attempt_unused = False
            if self.waited_for_slot:
                self.write(job.update_current_attempt, started_at=timezone.now())
            return
        if not self.write(job.start_attempt, backend, self.ctx.worker, reuse_current=self.attempt_unused):
            log.info("job no longer running; stopping", extra={"job_id": str(job.pk), "state": job.state})
            raise _Finished
        self.attempt_unused = False

    def close_attempt(self, error: str, started: float) -> None:
        """Close the current attempt with its own error (the job's final error is written separately)."""
        self.write(
            self.job.update_current_attempt,
            outcome=AttemptOutcome.FAILED,
            error=storable(error, TEXT_MAX),
            latency_ms=_ms_since(started),
            finished_at=timezone.now(),
        )

    def fail_exhausted(self) -> None:
        """Every candidate was tried or skipped, or the deadline passed: fail with the whole story."""
        if self.out_of_time or self.deadline.remaining() < MIN_CALL_S:
            n = self.calls
            error = f"deadline exceeded after {n} attempt{'s' if n != 1 else ''} (timeout_s={self.job.timeout_s})"
            if self.last_error:
                error += f"; last error: {self.last_error}"
        elif self.calls:
            error = f"{self.last_error} (gave up after {self.calls} attempts on {', '.join(self.tried)})"
        else:
            error = "No backend could take the job"
        if self.skipped:
            error += "; skipped: " + ", ".join(f"{n}: {why}" for n, why in self.skipped.items())
        self.write(self.job.mark_failed, error)
        log.info("job failed", extra={"job_id": str(self.job.pk), "error": error, "attempts": self.calls})

    # --- bookkeeping -----------------------------------------------------------------------------
    def log_extra(self, backend: Backend) -> dict:
        job = self.job
        return {"job_id": str(job.pk), "backend": backend.name, "policy": job.policy_name, "attempt": job.attempt_count}

    def _record(self, backend: Backend, started: float, *, ok: bool, error: str = "") -> None:
        """The call's figures and breaker, and its slot back, in one round trip."""
        outcome.record_call(backend, (time.monotonic() - started) * 1000, ok=ok, error=error, lease=self.lease)


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
