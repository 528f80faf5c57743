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
  ``BATCH_MAX``); a long job continues in the next round from where it stopped, greedy output
  the same as in one go. So a job that arrives while a 4,000-token job runs waits for one
  bounded round, not for the whole long job, and a short job in a batch with a long one is not
  held until the long one ends. A round of the same jobs (or fewer: finished ones leave)
  continues from the last round's KV cache; when a job joins, every row is prefilled again
  (prompt + generated ids), a price small next to decoding ``BATCH_ROUND_TOKENS`` tokens.
  (Splitting batches by requested length instead would still let one long batch block every
  job behind it.)

Each job keeps its own life cycle, written for the whole batch at once (on a fast GPU a
64-job batch of short answers takes well under a second, so per-job writes would cost a large
share of it): one ``Job.claim`` statement claims the gathered jobs (a compare-and-set: a
duplicate delivery or a canceled job is dropped), and each round's finished jobs get their own
result, usage, timing and cost in one ``Job.mark_succeeded_many`` transaction, their backend
figures in one Redis round trip and their fleet metrics through the write-behind buffer. A
request that is bad on its own (prompt longer than the context, images for a text model) fails
alone. A batch whose ``generate`` raises (CUDA OOM, a request that breaks the model) counts once
for the circuit breaker and is tried again in halves, down to single jobs (``Batch.round``). A job
that fails alone, or has a retryable error, goes the ordinary one-job path (``workers.tasks.JobRun``):
retried alone with backoff, then fallen back to the policy's next backend, and a job that crashes
even alone is marked errored with its traceback — so one poisonous request cannot fail the others.

As for the thread workers' own tasks, RQ keeps no per-job record (started registry, execution,
result): the row holds all of it, the RQ job hash is deleted when the job is done, and a worker
that dies mid-batch leaves its jobs to the heartbeat and the reconciler. RQ jobs that are not
our task run through the plain ``SimpleWorker`` path.

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
from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections
from django.utils import timezone
from redis.exceptions import RedisError
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.worker import WorkerStatus

from jobs import queueing, status_mirror
from jobs.models import AttemptOutcome, Job, JobState, Priority
from jobs.queueing import TASK
from orchestrator_site.redis import RoundTrip
from routing import circuit, stats
from routing.models import Backend, BackendKind
from workers.backends import get_adapter, hf_local
from workers.backends.base import BackendError, GenerationResult
from workers.backends.hf_local import HFLocalAdapter, Sequence
from workers.group_commit import RETRY_LOG_EVERY, RETRY_PAUSE_S
from workers.retry import Deadline
from workers.status import GPU_STATUS_KEY as STATUS_KEY
from workers.tasks import JobRun, generation_request, run_claimed
from workers.worker import OrchestratorWorker, record_run
from workers.write_behind import WriteBehind

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


def load_model(backend: Backend, limits: BatchLimits) -> None:
    """Load ``backend``'s model (first use only), warmed up for a full round of this worker's batches."""
    hf_local.load(backend.adapter_config(), warm_rows=limits.max_jobs, warm_tokens=limits.round_tokens)


class ResultsUnwritten(Exception):
    """A round's results could not be written before the worker's stop: the jobs are recovered."""


@dataclass
class Entry:
    """One job in the batch: its RQ job and queue, then (once claimed) our row and its sequence."""

    rq_job: RQJob
    queue: Queue
    since: datetime = field(default_factory=timezone.now)  # before the claim: what the run's metrics cover
    job: Job | None = None
    seq: Sequence | None = None

    @property
    def job_id(self) -> str:
        return str(self.rq_job.args[0])

    @property
    def backend(self) -> Backend:
        assert self.job is not None and self.job.backend is not None
        return self.job.backend


class GpuWorker(OrchestratorWorker):
    """A no-fork RQ worker that runs the waiting ``hf_local`` jobs of its queues in batches."""

    batch_limits: BatchLimits | None = None
    batch: Batch | None = None  # the batch running now (what the worker's status reports)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Fleet figures and RQ hash deletes, summed over a round and sent in one round trip after it.
        self.write_behind = WriteBehind()

    @property
    def slots(self) -> int:
        return (self.batch_limits or BatchLimits.from_settings()).max_jobs

    def in_flight(self) -> int:
        batch = self.batch
        return batch.size if batch is not None else 0

    def unwritten(self) -> int:
        batch = self.batch
        return batch.unwritten if batch is not None else 0

    def work(self, *args: Any, **kwargs: Any) -> bool:
        self.preload()
        try:
            return super().work(*args, **kwargs)
        finally:
            self.write_behind.flush(self.connection)

    def preload(self) -> None:
        """Load the models of this worker's queues before taking a job: the first batch then runs
        at full speed, and the admin shows the model resident as soon as the worker is up."""
        close_old_connections()
        names = set(self.queue_names())
        try:
            backends = list(Backend.objects.filter(kind=BackendKind.HF_LOCAL, enabled=True))
        except DatabaseError as exc:  # not fatal: each model then loads before its first batch
            log.warning("models not preloaded: the database did not answer", extra={"error": str(exc)})
            return
        for backend in backends:
            if names.isdisjoint(backend.queue_for(p) for p in Priority.values):
                continue
            try:
                load_model(backend, self.batch_limits or BatchLimits.from_settings())
            except BackendError as exc:  # its jobs fail with the reason; the worker serves the others
                log.warning("model not loaded", extra={"backend": backend.name, "error": exc.message})

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        """RQ dequeued ``job``: gather more waiting jobs, run them as a batch, finish each one."""
        limits = self.batch_limits or BatchLimits.from_settings()
        batch = self.batch = Batch(self, limits)
        try:
            batch.admit([(job, queue)])
            batch.fill()
            batch.run()
        except SystemExit:  # a second signal (cold stop): hand the batch's jobs back now
            batch.hand_back("stopped by a second signal before the job finished")
            raise
        finally:
            self.batch = None
            self.write_behind.flush(self.connection)
        self.set_state(WorkerStatus.IDLE)

    _stop_at: float | None = None

    def _shutdown(self) -> None:
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        super()._shutdown()

    def grace_over(self) -> bool:
        """A stop was asked ``WORKER_SHUTDOWN_GRACE_S`` ago: the batch's unfinished jobs go back."""
        return self._stop_at is not None and time.monotonic() - self._stop_at >= float(settings.WORKER_SHUTDOWN_GRACE_S)

    def execute_plain(self, job: RQJob, queue: Queue) -> None:
        """The ``SimpleWorker`` path, in this thread, for RQ jobs that are not our task."""
        self.perform_job(job, queue, self.prepare_execution(job))


class Batch:
    """The jobs one ``GpuWorker.execute_job`` call runs together, until every one has finished."""

    def __init__(self, worker: GpuWorker, limits: BatchLimits) -> None:
        self.worker = worker
        self.limits = limits
        self.adapter: HFLocalAdapter = get_adapter(BackendKind.HF_LOCAL)  # type: ignore[assignment]
        self.active: list[Entry] = []
        self.pending: list[Entry] = []  # dequeued, not yet claimed in the database
        self.rounds = 0
        self.last_batch_size = 0
        self.jobs = 0  # claimed into this batch, over all its rounds
        self.tokens = 0
        self.generate_s = 0.0
        self.opened: float | None = None  # when the first claim began
        self.unwritten = 0  # finished jobs whose results wait for the database (the worker's status)

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
        popped = self.worker.take_waiting(n)
        if popped:
            self.admit(popped)
        return len(popped)

    def admit(self, popped: list[tuple[RQJob, Queue]]) -> None:
        """Our own tasks wait for the claim; any other RQ job runs now, the plain way.

        No RQ bookkeeping per job (started registry, execution record, result), as for the
        thread workers' own tasks (``OrchestratorWorker.perform_lean``): the row holds all of it,
        and a worker that dies now leaves its jobs to our recovery (heartbeat and reconciler).
        """
        for rq_job, queue in popped:
            if rq_job.func_name == TASK and len(rq_job.args) == 1:
                self.pending.append(Entry(rq_job, queue))
                continue
            self.worker.execute_plain(rq_job, queue)
            self.worker.set_state(WorkerStatus.BUSY)  # still inside this batch (a SIGTERM now is a warm stop)

    def claim(self) -> None:
        """Claim the pending jobs in one statement (``Job.claim``) and start their sequences.

        Claims wait until the batch is gathered, so a job's started_at is when its batch starts.
        A job another delivery won, or canceled or deleted meanwhile, is dropped. A claimed job
        that is not for an ``hf_local`` backend of this pool (a disabled backend, a policy that
        sent it elsewhere) runs the one-job way, which falls back or fails it with the reason.
        """
        claiming, self.pending = self.pending, []
        if not claiming:
            return
        close_old_connections()
        ids = [e.job_id for e in claiming]
        self.load_models(ids)
        if self.opened is None:
            self.opened = time.monotonic()
        try:
            with status_mirror.batched():  # the claimed rows' mirror: one pipeline after the commit
                rows = {str(row.pk): row for row in Job.claim(ids, self.worker.name)}
        except Exception:
            # Nothing was claimed: back in front of their queues, in order (as the thread worker does).
            log.exception("claiming jobs failed; putting them back", extra={"jobs": len(ids)})
            close_old_connections()
            self.worker.push_back([(e.rq_job, e.queue) for e in claiming])
            time.sleep(1.0)
            return
        skipped = []
        for e in claiming:
            e.job = rows.pop(e.job_id, None)
            if e.job is None:
                skipped.append(e.job_id)
                self.worker.write_behind.delete(e.rq_job.key)
            elif not self.batchable(e):
                self.run_elsewhere(e)
            else:
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
                self.jobs += 1
        if skipped:
            log.info("jobs not claimable; skipped", extra={"jobs": skipped})

    def load_models(self, ids: list[str]) -> None:
        """Load (first use only) the models of these jobs before their claim, so a job's
        started_at..finished_at is its own run, not a model load. A load error fails the job later."""
        for backend in Backend.objects.filter(
            kind=BackendKind.HF_LOCAL, pk__in=Job.objects.filter(pk__in=ids).values("backend_id")
        ):
            try:
                load_model(backend, self.limits)
            except BackendError:
                pass

    def batchable(self, e: Entry) -> bool:
        """An enabled ``hf_local`` backend whose queue for the job's priority is the one it came from."""
        backend = e.job.backend if e.job is not None else None
        if backend is None or backend.kind != BackendKind.HF_LOCAL or not backend.enabled:
            return False
        return backend.queue_for(e.job.priority) == e.job.queue

    # --- running rounds ---------------------------------------------------------------------------
    def run(self) -> None:
        """Rounds until no job is left; waiting jobs join between rounds unless a stop was asked."""
        while self.active:
            self.drop_gone()
            self.expire()
            # One generate per backend (greedy and sampled jobs together: hf_local.RowSampling).
            groups: dict[int, list[Entry]] = {}
            for e in self.active:
                groups.setdefault(e.backend.pk, []).append(e)
            self.last_batch_size = len(self.active)
            for entries in groups.values():
                self.round(entries)
            self.rounds += 1
            self.worker.heartbeat()
            self.publish_status()
            self.worker.write_behind.flush(self.worker.connection)
            if self.worker.grace_over():
                self.hand_back(f"shut down before the job finished (grace {settings.WORKER_SHUTDOWN_GRACE_S:g}s)")
                break
            if not self.worker._stop_requested and len(self.active) < self.limits.max_jobs:
                self.take(self.limits.max_jobs - len(self.active))
                self.claim()
        if self.rounds:
            # What the GPU did against what the batch took, claims and writes included.
            wall_s = time.monotonic() - (self.opened or time.monotonic())
            log.info(
                "batch done",
                extra={
                    "jobs": self.jobs,
                    "rounds": self.rounds,
                    "tokens": self.tokens,
                    "generate_s": round(self.generate_s, 4),
                    "wall_s": round(wall_s, 4),
                    "tokens_per_s": round(self.tokens / wall_s, 1) if wall_s else 0,
                },
            )

    def round(self, entries: list[Entry], *, split_from: int = 0) -> None:
        """One bounded ``generate`` for ``entries`` (one backend); record those that finished.

        If it raises, the batch is tried again in halves, down to single jobs: a bad request is
        isolated in ~2·log2(n) calls, and a batch too big for the GPU's memory (CUDA OOM, which says
        nothing about any one job) finds a size that fits. Running every job alone instead would take
        n one-row calls (64 jobs on the H200: 64 × 1.15 s measured for one row, against ~1.5 s for the
        batch). A job that still fails alone goes the one-job way (retries, fallback, its own
        failure). ``split_from``: the size of the batch whose failure led here (0 for a round's own call).
        """
        backend = entries[0].backend
        seqs = [e.seq for e in entries if e.seq is not None]
        started = time.monotonic()
        before = sum(len(s.generated) for s in seqs)
        try:
            self.adapter.step(backend.adapter_config(), seqs, round_tokens=self.limits.round_tokens)
        except Exception as exc:
            failed = split_from or len(entries)
            error = f"batch of {failed} failed: {type(exc).__name__}: {exc}"
            if not split_from:
                log.exception("batch failed; trying it in halves", extra={"backend": backend.name, "jobs": failed})
                # One call failed, whatever its size: one failure for the breaker, or one bad request in
                # a batch of 64 would open the circuit on the 63 others. Jobs run alone record their own.
                self.record(backend, (time.monotonic() - started) * 1000, ok=False, error=error)
            if len(entries) > 1:
                half = len(entries) // 2
                self.round(entries[:half], split_from=failed)
                self.round(entries[half:], split_from=failed)
                return
            e = entries[0]
            log.warning("job failed its batch alone; running it the one-job way", extra={"job_id": e.job_id})
            self.active.remove(e)
            self.alone(e, f"{backend.name}: {error}", started)
            return
        self.generate_s += time.monotonic() - started
        self.tokens += sum(len(s.generated) for s in seqs) - before
        done = [e for e in entries if e.seq is not None and e.seq.done]
        for e in done:
            self.active.remove(e)
        self.succeeded(done)

    def drop_gone(self) -> None:
        """Stop generating for jobs canceled (or otherwise finished) while in the batch."""
        if self.rounds == 0:
            return
        ids = [e.job.pk for e in self.active]
        gone = set(Job.objects.filter(pk__in=ids).exclude(state=JobState.RUNNING).values_list("pk", flat=True))
        for e in [e for e in self.active if e.job.pk in gone]:
            self.active.remove(e)
            e.job.refresh_from_db(fields=["state"])
            log.info("job left the batch", extra={"job_id": e.job_id, "state": e.job.state})
            self.finish(e)

    def expire(self) -> None:
        """A job whose own deadline passed fails now instead of taking another round."""
        clock = time.monotonic()
        for e in [e for e in self.active if e.seq is not None and e.seq.deadline <= clock]:
            self.active.remove(e)
            error = f"{e.backend.name}: timed out after {e.job.timeout_s}s"
            e.job.mark_failed(error, latency_ms=int((clock - e.seq.started) * 1000))
            self.finish(e)

    def hand_back(self, why: str) -> int:
        """Put the batch's unfinished jobs back on their queues (``running -> queued``, the attempt
        closed as ``interrupted``), as the thread workers do at shutdown; returns how many.

        Popped jobs not claimed yet are still ``queued``: they go back to the front of their queues.
        A job that finished or was canceled meanwhile is left as it is.
        """
        close_old_connections()
        try:
            self.worker.push_back([(e.rq_job, e.queue) for e in self.pending])
        except RedisError:
            pass  # queued in the database, on no queue: the reconciler pushes them again
        self.pending = []
        requeued = 0
        for e in self.active:
            try:
                if e.job.requeue_lost(f"worker {self.worker.name} {why}; re-queued"):
                    queueing.enqueue(e.job)  # the same RQ job id: its hash is reused, not deleted
                    requeued += 1
                    record_run(e.job_id, e.queue.name, e.since, row=e.job, pipe=self.worker.write_behind)
                else:
                    self.finish(e)
            except Exception:  # Redis or the database down: the reconciler recovers the job
                log.exception("job not handed back", extra={"job_id": e.job_id})
        self.active = []
        if requeued:
            log.warning("re-queued jobs at shutdown", extra={"worker": self.worker.name, "jobs": requeued, "why": why})
        return requeued

    # --- outcomes ---------------------------------------------------------------------------------
    def succeeded(self, done: list[Entry]) -> None:
        """Record a round's finished sequences: their results in one transaction (one UPDATE run
        for every row, one for their attempts, one commit), the backends' live figures in one
        Redis round trip, the status mirror in one pipeline after the commit."""
        results: list[tuple[Entry, GenerationResult]] = []
        for e in done:
            try:
                results.append((e, self.adapter.result(e.seq)))
            except Exception:
                self.crashed(e, sys.exc_info())
        if not results:
            return
        moves = [
            (
                e.job,
                {
                    "output": r.output,
                    "finish_reason": r.finish_reason,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "latency_ms": r.latency_ms,
                    "cost": e.backend.cost_for(r.prompt_tokens, r.completion_tokens),
                },
            )
            for e, r in results
        ]
        try:
            won = self.write_results(moves)
        except ResultsUnwritten as exc:
            # Stopping with the database away: the rows still say running, on a worker about to be
            # gone; the reconciler re-runs them once its heartbeat lapses. Their RQ hashes stay.
            log.error("results not written at shutdown; their jobs will run again", extra={"error": str(exc)})
            return
        except Exception:
            # One bad row must not fail the others: write each alone; only the ones that fail alone crash.
            log.exception("batched result write failed; writing each job alone", extra={"jobs": len(moves)})
            close_old_connections()
            written, won = [], []
            for (e, r), move in zip(results, moves, strict=True):
                try:
                    won.append(Job.mark_succeeded_many([move])[0])
                    written.append((e, r))
                except Exception:
                    self.crashed(e, sys.exc_info())
            results = written
        rt = RoundTrip(self.worker.connection)
        for e, r in results:
            self.record_in(rt, e.backend, r.latency_ms, ok=True)
        self.send(rt)
        for (e, r), ok in zip(results, won, strict=True):
            log.info(
                "job succeeded" if ok else "result discarded (job no longer running)",
                extra={"job_id": e.job_id, "backend": e.backend.name, "latency_ms": r.latency_ms},
            )
            self.finish(e)

    def write_results(self, moves: list[tuple[Job, dict[str, Any]]]) -> list[bool]:
        """``Job.mark_succeeded_many``, tried again while the database is unreachable (a restart, a
        failover): nobody else would record these results while this worker is alive, and giving up
        would leave the jobs ``running`` for good. Once a stop's grace is over it raises
        ``ResultsUnwritten``: the worker exits and recovery re-runs the jobs. Other errors (a row
        the database refuses) are the caller's to isolate."""
        tries = 0
        try:
            while True:
                try:
                    with status_mirror.batched():
                        return Job.mark_succeeded_many(moves)
                except (OperationalError, InterfaceError) as exc:
                    tries += 1
                    self.unwritten = len(moves)
                    if self.worker.grace_over():
                        raise ResultsUnwritten(f"{len(moves)} results: {exc}") from exc
                    if tries == 1 or tries % RETRY_LOG_EVERY == 0:
                        (log.warning if tries == 1 else log.error)(
                            "result write failed; trying again until the database answers",
                            extra={"jobs": len(moves), "try": tries, "error": repr(exc), "pause_s": RETRY_PAUSE_S},
                        )
                    close_old_connections()
                    time.sleep(RETRY_PAUSE_S)
        finally:
            self.unwritten = 0

    def failed(self, e: Entry, exc: BackendError, started: float) -> None:
        """A permanent error fails the job with its message; anything else goes the one-job way."""
        latency_ms = int((time.monotonic() - started) * 1000)
        try:
            status = f" (HTTP {exc.status})" if exc.status else ""
            if not exc.retryable:
                # The request's fault, not the backend's health (as in workers.tasks).
                self.record(e.backend, latency_ms, ok=True, error=f"{exc.message}{status}")
                e.job.mark_failed(f"{e.backend.name}: {exc.message}{status}", latency_ms=latency_ms)
                log.info("job failed (permanent error)", extra={"job_id": e.job_id, "error": exc.message})
            else:
                self.record(e.backend, latency_ms, ok=False, error=exc.message)
                self.alone(e, f"{e.backend.name}: {exc.message}{status}", started)
                return
        except Exception:
            self.crashed(e, sys.exc_info())
            return
        self.finish(e)

    def alone(self, e: Entry, error: str, started: float) -> None:
        """``run_alone``, and the job finished whatever happens there."""
        try:
            self.run_alone(e, error, started)
        except Exception:
            self.crashed(e, sys.exc_info())
            return
        self.finish(e)

    def run_alone(self, e: Entry, error: str, started: float) -> None:
        """Hand a claimed job whose batched call failed to the one-job path: its retries, fallback
        and crash handling."""
        remaining = float(e.job.timeout_s) - (time.monotonic() - (e.seq.started if e.seq else started))
        run = JobRun(e.job, self.worker.name, Deadline(max(remaining, 0.0)))
        # The batched call was this attempt: close it, so the next call opens attempt n+1.
        run.close_attempt(error, started)
        run.attempt_unused = False
        run.calls, run.last_error = 1, error
        run.tried.append(e.backend.name)
        run.run()

    def run_elsewhere(self, e: Entry) -> None:
        """A claimed job this batch cannot run: the one-job path, here and now (see ``claim``)."""
        try:
            run_claimed(e.job, self.worker.name)
        except Exception:  # the task records adapter crashes itself; reaching here is our bug
            log.exception("job task crashed", extra={"job_id": e.job_id})
        self.finish(e)

    def crashed(self, e: Entry, exc_info: Any) -> None:
        """Our own handling broke: the row records the traceback (RQ keeps nothing, as for any of
        our tasks)."""
        log.error("batched job crashed", exc_info=exc_info, extra={"job_id": e.job_id})
        try:
            e.job.mark_failed(
                f"{e.backend.name}: unexpected {exc_info[0].__name__}: {exc_info[1]}",
                outcome=AttemptOutcome.ERRORED,
                traceback="".join(traceback.format_exception(*exc_info)),
            )
        except Exception:
            log.exception("could not record the crash", extra={"job_id": e.job_id})
        self.finish(e)

    def finish(self, e: Entry) -> None:
        """The job's fleet metrics and dashboard figures (``record_run``) and the deletion of its RQ
        hash, buffered in the worker's write-behind and sent after the round."""
        buffer = self.worker.write_behind
        buffer.delete(e.rq_job.key)
        record_run(e.job_id, e.queue.name, e.since, row=e.job, pipe=buffer)

    def record(self, backend: Backend, latency_ms: float, *, ok: bool, error: str = "") -> None:
        """Feed routing's live figures and the breaker for one call, in one round trip."""
        rt = RoundTrip(self.worker.connection)
        self.record_in(rt, backend, latency_ms, ok=ok, error=error)
        self.send(rt)

    @staticmethod
    def record_in(rt: RoundTrip, backend: Backend, latency_ms: float, *, ok: bool, error: str = "") -> None:
        """``record`` as part of ``rt`` (a round's finished jobs go in one round trip)."""
        stats.record_call_in(rt, backend.name, latency_ms=latency_ms, ok=ok, error=error)
        breaker = circuit.CircuitConfig.from_config(backend.config)
        circuit.record_in(rt, backend.name, ok=ok, config=breaker, error=error)

    def send(self, rt: RoundTrip) -> None:
        """A Redis hiccup must not change a job's outcome: the figures are lost, with a warning."""
        try:
            rt.execute()
        except RedisError as exc:
            log.warning("backend figures not recorded", extra={"error": str(exc)})

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
