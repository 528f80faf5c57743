"""The GPU worker: one process, one resident model, the waiting jobs run as one batch.

Start it on a GPU host for a pool's queues, in priority order::

    python manage.py rqworker gpu-high gpu-normal gpu-low --worker-class workers.runtime.gpu.GpuWorker

Why a worker class of its own:

- **No fork.** RQ's default ``Worker`` forks a work horse per job. CUDA does not survive
  ``fork`` (the CUDA runtime cannot be used in a child forked after it was initialised), and
  a model loaded per job would cost seconds each time. ``GpuWorker`` is a ``BaseWorker``
  (``workers.runtime.base``, a ``SimpleWorker``): jobs run in the worker process, where the model
  stays loaded (``workers.backends.hf_local``).
- **Dynamic batching.** A GPU generates a batch of rows in about the time it takes for one row:
  the card is wasted unless the waiting jobs run together. After
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
that fails alone, or has a retryable error, goes the ordinary one-job path (``workers.execution.job_run``):
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
import sys
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.utils import timezone
from redis.exceptions import RedisError
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.worker import WorkerStatus

from jobs import status_mirror
from jobs.models import Job, JobState, Priority
from orchestrator_site.redis import RoundTrip
from routing.models import Backend, BackendKind
from workers.backends import get_adapter, hf_local
from workers.backends.base import BackendError, GenerationResult
from workers.backends.hf_local import BatchRow, HFLocalAdapter
from workers.execution import outcome
from workers.execution.job_run import JobRun, RunContext, run_claimed
from workers.execution.request import generation_request, success_fields
from workers.execution.retry import Deadline
from workers.execution.run_figures import record_run
from workers.fleet import status
from workers.runtime.base import BaseWorker, Delivery, delivery_id, is_our_task
from workers.runtime.group_commit import DATABASE_AWAY, until_database_answers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchLimits:
    max_jobs: int = 64
    wait_s: float = 0.010
    round_tokens: int = 128

    @classmethod
    def from_settings(cls) -> BatchLimits:
        return cls(
            max_jobs=int(settings.BATCH_MAX),
            wait_s=int(settings.BATCH_WAIT_MS) / 1000,
            round_tokens=int(settings.BATCH_ROUND_TOKENS),
        )


def load_model(backend: Backend, limits: BatchLimits) -> None:
    """Load ``backend``'s model (first use only), warmed up for a full round of this worker's batches."""
    hf_local.load(backend.adapter_config(), warm_rows=limits.max_jobs, warm_tokens=limits.round_tokens)


class ResultsUnwritten(Exception):
    """A round's results could not be written before the worker's stop: the jobs are recovered."""


@dataclass(eq=False)
class BatchedDelivery(Delivery):
    """A delivery in the batch; once claimed and started, its row of the batched generate."""

    seq: BatchRow | None = None


class GpuWorker(BaseWorker):
    """A no-fork RQ worker that runs the waiting ``hf_local`` jobs of its queues in batches."""

    batch_limits: BatchLimits | None = None
    batch: Batch | None = None  # the batch running now (what the worker's status reports)

    @property
    def limits(self) -> BatchLimits:
        return self.batch_limits or BatchLimits.from_settings()

    @property
    def slots(self) -> int:
        return self.limits.max_jobs

    def in_flight(self) -> int:
        batch = self.batch
        return batch.size if batch is not None else 0

    def unwritten(self) -> int:
        batch = self.batch
        return batch.unwritten if batch is not None else 0

    def work(self, *args: Any, **kwargs: Any) -> bool:
        self.preload()
        return super().work(*args, **kwargs)

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
                load_model(backend, self.limits)
            except BackendError as exc:  # its jobs fail with the reason; the worker serves the others
                log.warning("model not loaded", extra={"backend": backend.name, "error": exc.message})

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        """RQ dequeued ``job``: gather more waiting jobs, run them as a batch, finish each one."""
        batch = self.batch = Batch(self, self.limits)
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

    def claim_rows(self, ids: list[str]) -> list[Job]:
        with status_mirror.batched():  # the claimed rows' mirror: one pipeline after the commit
            return Job.claim(ids, self.name)


class Batch:
    """The jobs one ``GpuWorker.execute_job`` call runs together, until every one has finished."""

    def __init__(self, worker: GpuWorker, limits: BatchLimits) -> None:
        self.worker = worker
        self.limits = limits
        self.adapter: HFLocalAdapter = get_adapter(BackendKind.HF_LOCAL)  # type: ignore[assignment]
        self.active: list[BatchedDelivery] = []
        self.pending: list[BatchedDelivery] = []  # dequeued, not yet claimed in the database
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
        while self.size < self.limits.max_jobs and not self.worker.stop_requested:
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
        """Our own tasks wait for the claim; any other RQ job runs now, the plain way."""
        for rq_job, queue in popped:
            if is_our_task(rq_job):
                self.pending.append(BatchedDelivery(rq_job, queue, delivery_id(rq_job)))
                continue
            self.worker.run_other(rq_job, queue)
            self.worker.set_state(WorkerStatus.BUSY)  # still inside this batch (a SIGTERM now is a warm stop)

    def claim(self) -> None:
        """Claim the pending jobs in one statement (``BaseWorker.claim_or_put_back``) and start their rows.

        Claims wait until the batch is gathered, so a job's started_at is when its batch starts.
        A job another delivery won, or canceled or deleted meanwhile, is dropped. A claimed job
        that is not for an ``hf_local`` backend of this pool (a disabled backend, a policy that
        sent it elsewhere) runs the one-job way, which falls back or fails it with the reason.
        """
        claiming, self.pending = self.pending, []
        if not claiming:
            return
        close_old_connections()
        self.load_models([e.job_id for e in claiming])
        if self.opened is None:
            self.opened = time.monotonic()
        if not self.worker.claim_or_put_back(claiming):
            return
        for e in claiming:
            if e.job is None:
                continue
            if not self.batchable(e):
                self.run_elsewhere(e)
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
            self.jobs += 1
        self.worker.drop_unclaimed([e for e in claiming if e.job is None])

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

    def batchable(self, e: BatchedDelivery) -> bool:
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
            groups: dict[int, list[BatchedDelivery]] = {}
            for e in self.active:
                groups.setdefault(e.backend.pk, []).append(e)
            self.last_batch_size = len(self.active)
            for deliveries in groups.values():
                self.round(deliveries)
            self.rounds += 1
            self.worker.heartbeat()
            self.publish_status()
            self.worker.write_behind.flush(self.worker.connection)
            if self.worker.grace_over():
                self.hand_back(f"shut down before the job finished (grace {settings.WORKER_SHUTDOWN_GRACE_S:g}s)")
                break
            if not self.worker.stop_requested and len(self.active) < self.limits.max_jobs:
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

    def round(self, deliveries: list[BatchedDelivery], *, split_from: int = 0) -> None:
        """One bounded ``generate`` for ``deliveries`` (one backend); record those that finished.

        If it raises, the batch is tried again in halves, down to single jobs: a bad request is
        isolated in ~2·log2(n) calls, and a batch too big for the GPU's memory (CUDA OOM, which says
        nothing about any one job) finds a size that fits. Running every job alone instead would take
        n one-row calls, each costing about as much as the whole batch. A job that still fails alone
        goes the one-job way (retries, fallback, its own
        failure). ``split_from``: the size of the batch whose failure led here (0 for a round's own call).
        """
        backend = deliveries[0].backend
        seqs = [e.seq for e in deliveries if e.seq is not None]
        started = time.monotonic()
        before = sum(len(s.generated) for s in seqs)
        try:
            self.adapter.step(backend.adapter_config(), seqs, round_tokens=self.limits.round_tokens)
        except Exception as exc:
            failed = split_from or len(deliveries)
            error = f"batch of {failed} failed: {type(exc).__name__}: {exc}"
            if not split_from:
                log.exception("batch failed; trying it in halves", extra={"backend": backend.name, "jobs": failed})
                # One call failed, whatever its size: one failure for the breaker, or one bad request in
                # a batch of 64 would open the circuit on the 63 others. Jobs run alone record their own.
                latency_ms = (time.monotonic() - started) * 1000
                outcome.record_call(backend, latency_ms, ok=False, error=error, client=self.redis)
            if len(deliveries) > 1:
                half = len(deliveries) // 2
                self.round(deliveries[:half], split_from=failed)
                self.round(deliveries[half:], split_from=failed)
                return
            e = deliveries[0]
            log.warning("job failed its batch alone; running it the one-job way", extra={"job_id": e.job_id})
            self.active.remove(e)
            self.continue_alone(e, f"{backend.name}: {error}", started)
            return
        self.generate_s += time.monotonic() - started
        self.tokens += sum(len(s.generated) for s in seqs) - before
        done = [e for e in deliveries if e.seq is not None and e.seq.done]
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
        """Put the batch's unfinished jobs back on their queues (``BaseWorker.requeue_interrupted``);
        returns how many.

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
                if self.worker.requeue_interrupted(e.job, why):
                    requeued += 1
                    record_run(e.job_id, e.queue.name, e.since, row=e.job, pipe=self.worker.write_behind)
                else:
                    self.finish(e)
            except Exception:  # Redis or the database down: the reconciler recovers the job
                log.exception("job not handed back", extra={"job_id": e.job_id})
        self.active = []
        self.worker.log_requeued(requeued, why)
        return requeued

    # --- outcomes ---------------------------------------------------------------------------------
    @property
    def redis(self) -> Any:
        return self.worker.connection

    def succeeded(self, done: list[BatchedDelivery]) -> None:
        """Record a round's finished rows: their results in one transaction (one UPDATE run for
        every row, one for their attempts, one commit), the backends' live figures in one Redis
        round trip, the status mirror in one pipeline after the commit."""
        results: list[tuple[BatchedDelivery, GenerationResult]] = []
        for e in done:
            try:
                results.append((e, self.adapter.result(e.seq)))
            except Exception:
                self.crashed(e, sys.exc_info())
        if not results:
            return
        moves = [(e.job, success_fields(r, e.backend)) for e, r in results]
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
        rt = RoundTrip(self.redis)
        for e, r in results:
            outcome.record_call_in(rt, e.backend, r.latency_ms, ok=True)
        outcome.send(rt)
        for (e, r), ok in zip(results, won, strict=True):
            outcome.log_success(ok, {"job_id": e.job_id, "backend": e.backend.name, "latency_ms": r.latency_ms})
            self.finish(e)

    def write_results(self, moves: list[tuple[Job, dict[str, Any]]]) -> list[bool]:
        """``Job.mark_succeeded_many``, tried again while the database is unreachable (a restart, a
        failover; ``group_commit.until_database_answers``). Once a stop's grace is over it raises
        ``ResultsUnwritten``: the worker exits and recovery re-runs the jobs. Other errors (a row
        the database refuses) are the caller's to isolate."""

        def write() -> list[bool]:
            with status_mirror.batched():
                return Job.mark_succeeded_many(moves)

        def give_up() -> bool:
            self.unwritten = len(moves)  # the worker's status shows them while the database is away
            return self.worker.grace_over()

        try:
            return until_database_answers(write, what="results", give_up=give_up, jobs=len(moves))
        except DATABASE_AWAY as exc:
            raise ResultsUnwritten(f"{len(moves)} results: {exc}") from exc
        finally:
            self.unwritten = 0

    def failed(self, e: BatchedDelivery, exc: BackendError, started: float) -> None:
        """A permanent error fails the job with its message; anything else goes the one-job way."""
        latency_ms = int((time.monotonic() - started) * 1000)
        try:
            if outcome.is_request_fault(exc):
                outcome.fail_for_request(outcome.direct, e.job, e.backend, exc, latency_ms)
            else:
                outcome.record_call(e.backend, latency_ms, ok=False, error=outcome.describe(exc), client=self.redis)
                self.continue_alone(e, f"{e.backend.name}: {outcome.describe(exc)}", started)
                return
        except Exception:
            self.crashed(e, sys.exc_info())
            return
        self.finish(e)

    def continue_alone(self, e: BatchedDelivery, error: str, started: float) -> None:
        """A claimed job whose batched call failed goes on the one-job path (its retries, fallback
        and crash handling), from the attempt that call made; finished whatever happens there."""
        try:
            remaining = float(e.job.timeout_s) - (time.monotonic() - (e.seq.started if e.seq else started))
            run = JobRun(e.job, RunContext(self.worker.name), Deadline(max(remaining, 0.0)))
            run.resume_after(e.backend, error, started)
        except Exception:
            self.crashed(e, sys.exc_info())
            return
        self.finish(e)

    def run_elsewhere(self, e: BatchedDelivery) -> None:
        """A claimed job this batch cannot run: the one-job path, here and now (see ``claim``)."""
        try:
            run_claimed(e.job, RunContext(self.worker.name))
        except Exception:  # the run records adapter crashes itself; reaching here is our bug
            log.exception("job task crashed", extra={"job_id": e.job_id})
        self.finish(e)

    def crashed(self, e: BatchedDelivery, exc_info: Any) -> None:
        """Our own handling broke: the row records the traceback."""
        log.error("batched job crashed", exc_info=exc_info, extra={"job_id": e.job_id})
        try:
            outcome.crash(outcome.direct, e.job, e.backend.name, exc_info)
        except Exception:
            log.exception("could not record the crash", extra={"job_id": e.job_id})
        self.finish(e)

    def finish(self, e: BatchedDelivery) -> None:
        """The job's figures and the deletion of its RQ hash, buffered and sent after the round."""
        self.worker.finish_own(e)

    def publish_status(self) -> None:
        """What the admin shows of a GPU worker: its models, its last batch and its tokens/s."""
        status.publish_gpu(
            self.worker.name,
            {
                "models": json.dumps(hf_local.resident_models()),
                "batch_size": self.last_batch_size,
                "rounds": self.rounds,
                "tokens_per_s": round(self.tokens / self.generate_s, 1) if self.generate_s else 0,
                "updated_at": timezone.now().isoformat(),
            },
        )
