"""The RQ task: load the row, claim it, run it on its backend (retrying, then falling back), record the outcome.

The RQ job carries only the job id. A duplicate delivery or a job canceled while
queued loses the compare-and-set in ``mark_running`` and does nothing; a result that
arrives after a cancel loses the CAS in ``mark_succeeded`` and is discarded.

Failure handling, all inside one run and under one deadline (``job.timeout_s`` caps every
attempt and every sleep together):

- a retryable ``BackendError`` (timeout, connection, 429, 5xx, truncated answer) is retried on
  the same backend after a jittered backoff (``workers.retry``) that never undercuts the
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
- a cancel (``JobRun.cancel``, set by the worker when the job is canceled while running or
  abandoned past its deadline) stops the backoff and any adapter that can stop early.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field

from django.db import close_old_connections
from django.utils import timezone
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from jobs.models import TEXT_MAX, AttemptOutcome, Job, storable
from orchestrator_site.redis import RoundTrip
from routing import capacity, circuit, stats
from routing.models import POOLED_KINDS, Backend
from workers import inflight
from workers.backends import get_adapter
from workers.backends.base import BackendError, GenerationRequest, JobCanceled
from workers.retry import Deadline, RetryPolicy

log = logging.getLogger(__name__)

# Leave at least this much of the deadline for a call; less is not worth starting.
MIN_CALL_S = 0.05
# How often a job waiting for a backend slot asks again (plus up to as much jitter).
SLOT_POLL_S = 0.02


def worker_name() -> str:
    if name := inflight.worker_name():
        return name
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
    inflight.note_job(job)
    worker = worker_name()
    if not inflight.write(job.mark_running, worker):
        log.info("job not claimable; skipped", extra={"job_id": job_id, "state": job.state})
        return f"skipped:{job.state}"
    return run_claimed(job, worker)


def run_claimed(job: Job, worker: str) -> str:
    """Run ``job``, already claimed by ``worker`` (``running``, its attempt open); returns its final state.

    The worker's main thread claims the jobs it pops in one batch (``Job.claim``) and hands each
    to a job thread here; ``run_job`` claims one by itself.
    """
    close_old_connections()
    return JobRun(job, worker, Deadline(float(job.timeout_s)), cancel=inflight.cancel_event()).run()


def generation_request(job: Job, timeout_s: float, cancel: threading.Event | None = None) -> GenerationRequest:
    """What an adapter gets for one call of ``job`` (the one place a Job becomes a request)."""
    return GenerationRequest(
        job_id=str(job.pk),
        messages=job.chat_messages(),
        images=job.image_payloads(),
        model=job.model,
        max_tokens=job.max_tokens,
        temperature=job.temperature,
        params=dict(job.params),
        timeout_s=timeout_s,
        attempt=job.attempt_count,
        cancel=cancel if cancel is not None else threading.Event(),
    )


class _Finished(Exception):
    """The job reached its final state (or stopped being ours); stop trying."""


@dataclass
class JobRun:
    """One delivery of a job: the backends to try, in order, under one deadline."""

    job: Job
    worker: str
    deadline: Deadline
    # Set by the worker when the job is canceled while running or abandoned past its deadline.
    cancel: threading.Event = field(default_factory=threading.Event)
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

    def run(self) -> str:
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
        return self.job.state

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
        breaker = circuit.CircuitConfig.from_config(backend.config)
        retry_after: float | None = None
        self.out_of_time = False  # about the last backend tried: an earlier one's Retry-After is not the story
        for n in range(policy.retries + 1):
            if n:
                wait = policy.delay_s(n, retry_after)
                if not self.deadline.allows_wait(wait, min_call_s=MIN_CALL_S):
                    self.out_of_time = True
                    log.info("no time left to retry here", extra={**self.ctx(backend), "wait_s": round(wait, 3)})
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
                exc = self.call(backend, breaker)
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
                    log.warning("circuit unavailable; calling anyway", extra={**self.ctx(backend), "error": str(error)})
                    return lease, True
                allowed, state, _trial = asked.value
                if not allowed:
                    log.info("circuit does not allow a call", extra={**self.ctx(backend), "circuit": state})
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
            log.warning("half-open trial not handed back", extra={**self.ctx(backend), "error": str(exc)})

    def call(self, backend: Backend, breaker: circuit.CircuitConfig) -> BackendError:
        """One call; returns the retryable error, or raises _Finished when the job reached its end."""
        job = self.job
        self.calls += 1
        if backend.name not in self.tried:
            self.tried.append(backend.name)
        request = generation_request(job, self.deadline.remaining(), cancel=self.cancel)
        ctx = self.ctx(backend)
        log.info("attempt started", extra=ctx)
        started = time.monotonic()
        try:
            result = get_adapter(backend.kind).generate(backend.adapter_config(), request)
        except JobCanceled:
            # Canceled (the cancel closed the attempt) or abandoned past its deadline (failed by the
            # watchdog): either way the job's outcome is written and this call is not the backend's fault.
            log.info("call stopped: job canceled", extra=ctx)
            raise _Finished from None
        except BackendError as exc:
            status = f" (HTTP {exc.status})" if exc.status else ""
            error = f"{backend.name}: {exc.message}{status}"
            # A permanent error (bad input, 4xx) is the request's fault, not the backend's health.
            self._record(backend, breaker, started, ok=not exc.retryable, error=f"{exc.message}{status}")
            if not exc.retryable:
                inflight.write(job.mark_failed, error, latency_ms=_ms_since(started))
                log.info("job failed (permanent error)", extra={**ctx, "error": exc.message})
                raise _Finished from None
            self.last_error = error
            self.close_attempt(error, started)
            log.info("attempt failed (retryable)", extra={**ctx, "error": exc.message})
            return exc
        except JobTimeoutException:
            self._record(backend, breaker, started, ok=False, error=f"timed out after {job.timeout_s}s")
            inflight.write(
                job.mark_failed, f"{backend.name}: timed out after {job.timeout_s}s", latency_ms=_ms_since(started)
            )
            log.info("job timed out", extra=ctx)
            raise _Finished from None
        except Exception as exc:  # a bug in an adapter must not kill the worker or loop forever
            error = f"unexpected {type(exc).__name__}: {exc}"
            self._record(backend, breaker, started, ok=False, error=error)
            inflight.write(
                job.mark_failed,
                f"{backend.name}: {error}",
                outcome=AttemptOutcome.ERRORED,
                traceback=traceback.format_exc(),
                latency_ms=_ms_since(started),
            )
            log.exception("job errored", extra=ctx)
            raise _Finished from None
        self._record(backend, breaker, started, ok=True)
        outcome = {
            "output": result.output,
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "latency_ms": result.latency_ms,
            "cost": backend.cost_for(result.prompt_tokens, result.completion_tokens),
            "finished_at": timezone.now(),  # the write may come a moment later (group commit)
        }
        latency_ms = result.latency_ms

        def written(won: bool) -> None:
            log.info(
                "job succeeded" if won else "result discarded (job no longer running)",
                extra={**ctx, "latency_ms": latency_ms},
            )

        # In a worker's job thread this returns before the commit: the slot is free for the next job.
        inflight.write_batched(Job.mark_succeeded_many, (job, outcome), then=written)
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
                inflight.write(job.update_current_attempt, started_at=timezone.now())
            return
        if not inflight.write(job.start_attempt, backend, self.worker, reuse_current=self.attempt_unused):
            log.info("job no longer running; stopping", extra={"job_id": str(job.pk), "state": job.state})
            raise _Finished
        self.attempt_unused = False

    def close_attempt(self, error: str, started: float) -> None:
        """Close the current attempt with its own error (the job's final error is written separately)."""
        inflight.write(
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
        inflight.write(self.job.mark_failed, error)
        log.info("job failed", extra={"job_id": str(self.job.pk), "error": error, "attempts": self.calls})

    # --- bookkeeping -----------------------------------------------------------------------------
    def ctx(self, backend: Backend) -> dict:
        job = self.job
        return {"job_id": str(job.pk), "backend": backend.name, "policy": job.policy_name, "attempt": job.attempt_count}

    def _record(
        self, backend: Backend, breaker: circuit.CircuitConfig, started: float, *, ok: bool, error: str = ""
    ) -> None:
        """Feed the live figures and the breaker and give the slot back, in one round trip; a Redis
        hiccup must not change the job's outcome (the slot's lease then expires by itself)."""
        latency_ms = (time.monotonic() - started) * 1000
        rt = RoundTrip()
        stats.record_call_in(rt, backend.name, latency_ms=latency_ms, ok=ok, error=error)
        circuit.record_in(rt, backend.name, ok=ok, config=breaker, error=error)
        if self.lease is not None:
            capacity.release_in(rt, self.lease)
        try:
            rt.execute()
        except RedisError as exc:
            log.warning(
                "call outcome not recorded (figures, breaker, slot)", extra={"backend": backend.name, "error": str(exc)}
            )


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
