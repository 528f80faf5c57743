"""The GPU worker: one process, one resident model, the waiting jobs run as one batch.

Start it on a GPU host for a pool's queues, in priority order::

    python manage.py rqworker gpu-high gpu-normal gpu-low --worker-class workers.gpu_worker.GpuWorker

Why a worker class of its own:

- **No fork.** RQ's default ``Worker`` forks a work horse per job. CUDA does not survive
  ``fork`` (the CUDA runtime cannot be used in a child forked after it was initialised), and
  a model loaded per job would cost seconds each time. ``GpuWorker`` is a ``SimpleWorker``
  (through ``OrchestratorWorker``): jobs run in the worker process, where the model stays
  loaded (``workers.backends.hf_local``).
- **Dynamic batching.** On an H100 a 1.1B model generated ~19 tokens/s one job at a time and
  ~1,174 tokens/s at batch 64: the card is wasted unless the waiting jobs run together. After
  RQ hands us one job, we take up to ``BATCH_MAX`` more that are already waiting, from the
  worker's queues in the order given (high before normal before low), waiting at most
  ``BATCH_WAIT_MS`` for stragglers, and run them as one left-padded ``model.generate``.
- **Bounded rounds.** A batch runs in rounds of at most ``BATCH_ROUND_TOKENS`` new tokens. After
  each round, finished jobs are recorded at once and waiting jobs join the batch (up to
  ``BATCH_MAX``); a long job continues in the next round from where it stopped (prompt +
  generated ids are fed again, so greedy output is the same as in one go). So a job that
  arrives while a 4,000-token job runs waits for one bounded round, not for the whole long
  job, and a short job in a batch with a long one is not held until the long one ends. The
  price is one extra prefill per round for the sequences that continue, small next to the
  decoding of ``BATCH_ROUND_TOKENS`` tokens. (Splitting batches by requested length instead
  would still let one long batch block every job behind it.)

Each job keeps its own life cycle: ``Job.mark_running`` claims it (a compare-and-set: a
duplicate delivery or a canceled job is skipped), and its own result, usage, timing and cost
(``mark_succeeded``) or its own error (``mark_failed``) are written as it finishes. A request
that is bad on its own (prompt longer than the context, images for a text model) fails alone.
A retryable error, or a crash of a whole batch (CUDA OOM, a bug), hands each of its jobs to the
ordinary one-job path (``workers.tasks.JobRun``): retried alone with backoff, then fallen back
to the policy's next backend, and a job that crashes even alone is marked errored with its
traceback — so one poisonous request cannot fail the others.

RQ's bookkeeping is kept per job: each RQ job gets its execution, is moved to the started
registry and then finished (or failed, when our own handling crashed) with the same calls
RQ's ``perform_job`` makes, so registries do not leak. Jobs that are not ``run_job`` calls for
an ``hf_local`` backend of this pool run through the plain ``SimpleWorker`` path.

Settings (``settings.X`` or the environment): ``BATCH_MAX`` (64), ``BATCH_WAIT_MS`` (10),
``BATCH_ROUND_TOKENS`` (128).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import close_old_connections, transaction
from django.utils import timezone
from redis.exceptions import RedisError
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.utils import now
from rq.worker import WorkerStatus

from jobs.models import Job, JobState
from jobs.queueing import TASK
from routing import circuit, stats
from routing.models import Backend, BackendKind
from workers.backends import get_adapter, hf_local
from workers.backends.base import BackendError
from workers.backends.hf_local import HFLocalAdapter, Sequence
from workers.retry import Deadline
from workers.status import GPU_STATUS_KEY as STATUS_KEY
from workers.tasks import JobRun, generation_request
from workers.worker import OrchestratorWorker, record_run

log = logging.getLogger(__name__)

STATUS_TTL_S = 120


def _setting(name: str, default: int, minimum: int) -> int:
    """``settings.NAME`` when set, else the environment, else ``default``."""
    value = getattr(settings, name, None)
    if value is None:
        raw = os.environ.get(name, "").strip()
        value = int(raw) if raw else default
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}={value} is below the minimum {minimum}")
    return value


@dataclass(frozen=True)
class BatchLimits:
    max_jobs: int = 64
    wait_s: float = 0.010
    round_tokens: int = 128

    @classmethod
    def from_settings(cls) -> BatchLimits:
        return cls(
            max_jobs=_setting("BATCH_MAX", 64, 1),
            wait_s=_setting("BATCH_WAIT_MS", 10, 0) / 1000,
            round_tokens=_setting("BATCH_ROUND_TOKENS", 128, 1),
        )


@dataclass
class Entry:
    """One job in the batch: the RQ job and its execution, our row, and its sequence."""

    rq_job: RQJob
    queue: Queue
    execution: Execution
    job: Job
    backend: Backend
    seq: Sequence | None = None
    since: datetime = field(default_factory=timezone.now)  # before the claim: what the run's metrics cover


class GpuWorker(OrchestratorWorker):
    """A no-fork RQ worker that runs the waiting ``hf_local`` jobs of its queues in batches."""

    batch_limits: BatchLimits | None = None
    batch: Batch | None = None  # the batch running now (what the worker's status reports)

    @property
    def slots(self) -> int:
        return (self.batch_limits or BatchLimits.from_settings()).max_jobs

    def in_flight(self) -> int:
        batch = self.batch
        return batch.size if batch is not None else 0

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        """RQ dequeued ``job``: gather more waiting jobs, run them as a batch, finish each one."""
        limits = self.batch_limits or BatchLimits.from_settings()
        batch = self.batch = Batch(self, limits)
        try:
            batch.admit([(job, queue)])
            batch.fill()
            batch.run()
        finally:
            self.batch = None
        self.set_state(WorkerStatus.IDLE)

    def execute_plain(self, job: RQJob, queue: Queue) -> None:
        """The ``SimpleWorker`` path, in this thread, for jobs that are not batchable."""
        self.perform_job(job, queue, self.prepare_execution(job))


class Batch:
    """The jobs one ``GpuWorker.execute_job`` call runs together, until every one has finished."""

    def __init__(self, worker: GpuWorker, limits: BatchLimits) -> None:
        self.worker = worker
        self.limits = limits
        self.adapter: HFLocalAdapter = get_adapter(BackendKind.HF_LOCAL)  # type: ignore[assignment]
        self.active: list[Entry] = []
        self.pending: list[Entry] = []  # dequeued (RQ: started), not yet claimed in the database
        self.rounds = 0
        self.last_batch_size = 0
        self.tokens = 0
        self.generate_s = 0.0

    # --- taking jobs ------------------------------------------------------------------------------
    def fill(self) -> None:
        """Take waiting jobs until the batch is full or ``BATCH_WAIT_MS`` has passed, then claim them."""
        until = time.monotonic() + self.limits.wait_s
        while self.size < self.limits.max_jobs and not self.worker._stop_requested:
            taken = self.take(self.limits.max_jobs - self.size)
            left = until - time.monotonic()
            if left <= 0:
                break
            if not taken:
                time.sleep(min(0.002, left))
        self.claim()

    @property
    def size(self) -> int:
        return len(self.active) + len(self.pending)

    def take(self, n: int) -> int:
        """Pop up to ``n`` waiting RQ jobs, highest-priority queue first, into ``pending``."""
        w = self.worker
        popped: list[tuple[RQJob, Queue]] = []
        for queue in w.queues:
            if len(popped) >= n:
                break
            ids = w.connection.lpop(queue.key, n - len(popped))  # LPOP with a count: one round trip per queue
            if not ids:
                continue
            ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
            for rq_job in w.job_class.fetch_many(ids, connection=w.connection, serializer=w.serializer):
                if rq_job is not None:  # None: deleted since it was queued, as RQ's own dequeue skips it
                    popped.append((rq_job, queue))
        if popped:
            self.admit(popped)
        return len(popped)

    def admit(self, popped: list[tuple[RQJob, Queue]]) -> None:
        """Move dequeued jobs into RQ's started registry at once (so a worker that dies now leaves
        them for RQ's abandoned-job cleanup, not lost); non-batchable ones run the plain way."""
        close_old_connections()
        w = self.worker
        rows = self._batchable_rows([rq_job for rq_job, _ in popped])
        for rq_job, queue in popped:
            row = rows.get(rq_job.id)
            if row is None:
                w.execute_plain(rq_job, queue)
                w.set_state(WorkerStatus.BUSY)  # still inside this batch (a SIGTERM now is a warm stop)
                continue
            execution = w.prepare_execution(rq_job)
            w.prepare_job_execution(rq_job, remove_from_intermediate_queue=len(w.queues) == 1)
            rq_job.started_at = now()
            self.pending.append(Entry(rq_job, queue, execution, row, row.backend))

    def claim(self) -> None:
        """Claim the pending jobs (``mark_running``) and start their sequences.

        Claims wait until the batch is gathered, so a job's started_at is when its batch starts.
        All claims go in one transaction: one commit (and one burst of status-mirror writes after
        it) instead of one per job; each claim is still its own compare-and-set.
        """
        claiming, self.pending = self.pending, []
        if not claiming:
            return
        for e in claiming:
            try:
                # Load the model (first job only) before the claim, so a job's started_at..finished_at
                # is its own run, not the worker's start-up. A load error fails the job in start() below.
                hf_local.load(e.backend.adapter_config())
            except BackendError:
                pass
        won: list[bool] = []
        try:
            with transaction.atomic():
                won = [e.job.mark_running(self.worker.name) for e in claiming]
        except Exception:
            for e in claiming:
                self.crashed(e, sys.exc_info())
            return
        for e, ok in zip(claiming, won, strict=True):
            if not ok:
                log.info("job not claimable; skipped", extra={"job_id": str(e.job.pk), "state": e.job.state})
                self.finish_rq(e, f"skipped:{e.job.state}")
                continue
            try:
                request = generation_request(e.job, float(e.job.timeout_s))
                e.seq = self.adapter.start(e.backend.adapter_config(), request)
            except BackendError as exc:
                self.failed(e, exc, time.monotonic())
                continue
            except Exception:
                self.crashed(e, sys.exc_info())
                continue
            self.active.append(e)

    def _batchable_rows(self, rq_jobs: list[RQJob]) -> dict[str, Job]:
        """Our rows (one query) for the RQ jobs that are ``run_job`` calls for a queued job on an
        ``hf_local`` backend of this pool; the others go the plain way, where ``run_job`` reports a
        missing row, skips a claimed one or falls back from a disabled backend."""
        ids = {str(j.args[0]): j.id for j in rq_jobs if j.func_name == TASK and len(j.args) == 1}
        rows: dict[str, Job] = {}
        for row in Job.objects.select_related("backend").filter(pk__in=list(ids)):
            backend = row.backend
            if row.state != JobState.QUEUED or backend is None:
                continue
            if backend.kind != BackendKind.HF_LOCAL or not backend.enabled:
                continue
            if backend.queue_for(row.priority) != row.queue:
                continue
            rows[ids[str(row.pk)]] = row
        return rows

    # --- running rounds ---------------------------------------------------------------------------
    def run(self) -> None:
        """Rounds until no job is left; waiting jobs join between rounds unless a stop was asked."""
        while self.active:
            self.drop_gone()
            self.expire()
            # One generate per backend and sampling setting, so a crash fails only its own call.
            groups: dict[tuple[int, Any], list[Entry]] = {}
            for e in self.active:
                groups.setdefault((e.backend.pk, e.seq.sampling if e.seq else None), []).append(e)
            self.last_batch_size = len(self.active)
            for entries in groups.values():
                self.round(entries)
            self.rounds += 1
            self.worker.heartbeat()
            self.publish_status()
            if not self.worker._stop_requested and len(self.active) < self.limits.max_jobs:
                self.take(self.limits.max_jobs - len(self.active))
                self.claim()

    def round(self, entries: list[Entry]) -> None:
        """One bounded ``generate`` for ``entries`` (one backend and sampling); record those that finished."""
        backend = entries[0].backend
        seqs = [e.seq for e in entries if e.seq is not None]
        started = time.monotonic()
        before = sum(len(s.generated) for s in seqs)
        try:
            self.adapter.step(backend.adapter_config(), seqs, round_tokens=self.limits.round_tokens)
        except Exception as exc:  # the whole batch failed: run each job alone, where it fails alone
            error = f"batch of {len(entries)} failed: {type(exc).__name__}: {exc}"
            log.exception("batch failed; running its jobs one by one", extra={"backend": backend.name})
            for e in entries:
                self.active.remove(e)
                self.failed(e, BackendError(error, retryable=True), started)
            return
        self.generate_s += time.monotonic() - started
        self.tokens += sum(len(s.generated) for s in seqs) - before
        done = [e for e in entries if e.seq is not None and e.seq.done]
        # One transaction for the round's results (one commit, not one per job); RQ hears after it.
        with transaction.atomic():
            recorded = [e for e in done if self.succeeded(e)]
        for e in done:
            self.active.remove(e)
        for e in recorded:
            self.finish_rq(e, e.job.state)

    def drop_gone(self) -> None:
        """Stop generating for jobs canceled (or otherwise finished) while in the batch."""
        if self.rounds == 0:
            return
        ids = [e.job.pk for e in self.active]
        gone = set(Job.objects.filter(pk__in=ids).exclude(state=JobState.RUNNING).values_list("pk", flat=True))
        for e in [e for e in self.active if e.job.pk in gone]:
            self.active.remove(e)
            e.job.refresh_from_db(fields=["state"])
            log.info("job left the batch", extra={"job_id": str(e.job.pk), "state": e.job.state})
            self.finish_rq(e, f"skipped:{e.job.state}")

    def expire(self) -> None:
        """A job whose own deadline passed fails now instead of taking another round."""
        clock = time.monotonic()
        for e in [e for e in self.active if e.seq is not None and e.seq.deadline <= clock]:
            self.active.remove(e)
            error = f"{e.backend.name}: timed out after {e.job.timeout_s}s"
            e.job.mark_failed(error, latency_ms=int((clock - e.seq.started) * 1000))
            self.finish_rq(e, e.job.state)

    # --- outcomes ---------------------------------------------------------------------------------
    def succeeded(self, e: Entry) -> bool:
        """Record a finished sequence on its row; False when that crashed (RQ was told already)."""
        assert e.seq is not None
        try:
            result = self.adapter.result(e.seq)
            self.record(e.backend, result.latency_ms, ok=True)
            won = e.job.mark_succeeded(
                output=result.output,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                latency_ms=result.latency_ms,
                cost=e.backend.cost_for(result.prompt_tokens, result.completion_tokens),
            )
            log.info(
                "job succeeded" if won else "result discarded (job no longer running)",
                extra={"job_id": str(e.job.pk), "backend": e.backend.name, "latency_ms": result.latency_ms},
            )
        except Exception:
            self.crashed(e, sys.exc_info())
            return False
        return True

    def failed(self, e: Entry, exc: BackendError, started: float) -> None:
        """A permanent error fails the job with its message; anything else goes the one-job way."""
        latency_ms = int((time.monotonic() - started) * 1000)
        try:
            if e.job.state != JobState.RUNNING:  # never claimed (the error came before mark_running)
                self.finish_rq(e, f"skipped:{e.job.state}")
                return
            status = f" (HTTP {exc.status})" if exc.status else ""
            if not exc.retryable:
                # The request's fault, not the backend's health (as in workers.tasks).
                self.record(e.backend, latency_ms, ok=True, error=f"{exc.message}{status}")
                e.job.mark_failed(f"{e.backend.name}: {exc.message}{status}", latency_ms=latency_ms)
                log.info("job failed (permanent error)", extra={"job_id": str(e.job.pk), "error": exc.message})
            else:
                self.record(e.backend, latency_ms, ok=False, error=exc.message)
                self.run_alone(e, f"{e.backend.name}: {exc.message}{status}", started)
        except Exception:
            self.crashed(e, sys.exc_info())
            return
        self.finish_rq(e, e.job.state)

    def run_alone(self, e: Entry, error: str, started: float) -> None:
        """Hand a claimed job to the one-job path: its retries, fallback and crash handling."""
        remaining = float(e.job.timeout_s) - (time.monotonic() - (e.seq.started if e.seq else started))
        run = JobRun(e.job, self.worker.name, Deadline(max(remaining, 0.0)))
        # The batched call was this attempt: close it, so the next call opens attempt n+1.
        run.close_attempt(error, started)
        run.attempt_unused = False
        run.calls, run.last_error = 1, error
        run.tried.append(e.backend.name)
        run.run()

    def crashed(self, e: Entry, exc_info: Any) -> None:
        """Our own handling broke: the row records the traceback, RQ marks the job failed."""
        log.error("batched job crashed", exc_info=exc_info, extra={"job_id": str(e.job.pk)})
        try:
            from jobs.models import AttemptOutcome

            e.job.mark_failed(
                f"{e.backend.name}: unexpected {exc_info[0].__name__}: {exc_info[1]}",
                outcome=AttemptOutcome.ERRORED,
                traceback="".join(traceback.format_exception(*exc_info)),
            )
        except Exception:
            log.exception("could not record the crash", extra={"job_id": str(e.job.pk)})
        self.worker._finalize_failure(e.rq_job, e.queue, e.execution, exc_info)
        record_run(str(e.job.pk), e.queue.name, e.since)

    def finish_rq(self, e: Entry, return_value: str) -> None:
        """RQ's own success bookkeeping (result, registries, counters), as ``perform_job`` does it,
        then the job's fleet metrics and dashboard figures (``record_run``), as for any worker."""
        try:
            self.worker._finalize_success(e.rq_job, e.queue, e.execution, return_value)
        except Exception:
            self.worker._finalize_failure(e.rq_job, e.queue, e.execution, sys.exc_info())
        record_run(str(e.job.pk), e.queue.name, e.since, row=e.job)

    def record(self, backend: Backend, latency_ms: float, *, ok: bool, error: str = "") -> None:
        """Feed routing's live figures and the breaker; a Redis hiccup must not change the outcome."""
        try:
            stats.record_call(backend.name, latency_ms=latency_ms, ok=ok, error=error)
            circuit.record(backend.name, ok=ok, config=circuit.CircuitConfig.from_config(backend.config), error=error)
        except RedisError as exc:
            log.warning("backend figures not recorded", extra={"backend": backend.name, "error": str(exc)})

    def publish_status(self) -> None:
        """What the admin shows of a GPU worker: its models, its last batch and its tokens/s."""
        status = {
            "models": json.dumps(hf_local.resident_models()),
            "batch_size": self.last_batch_size,
            "rounds": self.rounds,
            "tokens_per_s": round(self.tokens / self.generate_s, 1) if self.generate_s else 0,
            "updated_at": timezone.now().isoformat(),
        }
        key = STATUS_KEY.format(name=self.worker.name)
        try:
            pipe = self.worker.connection.pipeline(transaction=False)
            pipe.hset(key, mapping=status)
            pipe.expire(key, STATUS_TTL_S)
            pipe.execute()
        except RedisError:
            pass
