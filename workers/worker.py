"""The worker class behind ``manage.py rqworker`` (set in ``settings.RQ['WORKER_CLASS']``).

One process runs up to ``MAX_CONCURRENCY`` jobs at once in a pool of threads
(``workers.inflight``); RQ's loop in the main thread dequeues only when the threads have room
(free slots, plus a few claimed jobs waiting), in priority order, and a free thread takes the
highest-priority waiting job. Database writes go through one writer thread
(``workers.group_commit``).

Shutdown (SIGTERM or SIGINT, as Kubernetes and systemd send it): stop taking jobs, hand the
claimed jobs no thread started back at once, let the running ones finish for
``WORKER_SHUTDOWN_GRACE_S``, then put the rest back on their queues (``running -> queued``, the
attempt closed as ``interrupted``) and exit 0. A second signal
re-queues at once. A job whose thread outlives the re-queue cannot write an outcome: the
process exits, and the fenced compare-and-set would refuse it anyway.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone
from redis.exceptions import RedisError
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from jobs import queueing
from jobs.models import Job, JobState
from jobs.queueing import RQ_TIMEOUT_GRACE_S, TASK
from orchestrator_site import metrics, tracing
from routing import capacity
from workers import status
from workers.heartbeat import Heartbeat
from workers.inflight import JobThreads, Running
from workers.tasks import run_claimed
from workers.write_behind import WriteBehind

log = logging.getLogger(__name__)


class NoDeathPenalty(BaseDeathPenalty):
    """RQ's SIGALRM death penalty works only in the main thread; our jobs run in pool threads.

    Deadlines are ours instead: the job's own (``workers.retry.Deadline``, passed to the adapter
    as its timeout) and the watcher's hard deadline (``workers.inflight``).
    """

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class OrchestratorWorker(SimpleWorker):
    """Runs jobs in threads of the worker process itself, with the JSON serializer.

    No fork per job: forking costs most of RQ's per-job time (~69 vs ~267 no-op jobs/s
    on our machines), drops the process's warm DB and Redis connections, and breaks
    CUDA. ``rqworker`` passes its own ``--serializer`` default (pickle); we always use
    JSON because our RQ jobs carry only a job id and pickle is never needed.
    """

    death_penalty_class = NoDeathPenalty
    max_concurrency: int | None = None  # None: settings.MAX_CONCURRENCY

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["serializer"] = JSONSerializer
        # host.pid instead of RQ's random hex, so a job's `worker` says where it ran.
        # RQ's Worker.all()/find_by_key() pass the stored name positionally (second argument).
        if len(args) < 2:
            kwargs["name"] = kwargs.get("name") or f"{socket.gethostname()}.{os.getpid()}"
        super().__init__(*args, **kwargs)
        self.job_threads: JobThreads | None = None  # made on the first job
        self._waiting_for_job = False
        self._started = timezone.now().isoformat()

    def work(self, *args: Any, **kwargs: Any) -> bool:
        """Beat a liveness key while working, so the jobs of a killed worker are recovered in seconds."""
        tune_gc(int(settings.WORKER_GC_GEN0))
        beat = Heartbeat(self.name, on_beat=self.on_beat)
        beat.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            beat.stop()
            self.publish_status(gone=True)

    # --- many jobs at once ------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return int(self.max_concurrency or settings.MAX_CONCURRENCY)

    @property
    def prefetch(self) -> int:
        return int(settings.WORKER_PREFETCH)

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        """Hand ``job`` to the job threads, with as many more waiting jobs as they have room for.

        RQ's loop hands us one job per blocking dequeue; we pop more at once (one LPOP per queue,
        in priority order, and one fetch) up to the threads' room (``slots`` running plus a few
        waiting: ``workers.inflight``), claim them all in one transaction, and return once there
        is room again.
        """
        if self.job_threads is None:
            self.job_threads = JobThreads(self.slots, self._perform_entry, self.name, prefetch=self.prefetch)
            self._rank = {q.name: i for i, q in enumerate(self.queues)}
        batch = [(job, queue)]
        room = self.job_threads.room - 1
        if room > 0 and not self._stop_requested:
            batch += self.take_waiting(room)
        self._hand_over(batch)
        while not self.job_threads.wait_for_slot(timeout=5.0) and not self._stop_requested:
            self.heartbeat()  # every slot is busy: keep RQ's worker key alive meanwhile

    def _hand_over(self, batch: list[tuple[RQJob, Queue]]) -> None:
        """Claim our own tasks' jobs in one transaction (``Job.claim``: through the writer thread on
        SQLite, which has one writer at a time; from this thread on PostgreSQL), then hand every job
        to the threads. A job that cannot be claimed (another delivery won, canceled or deleted
        meanwhile) is dropped: its RQ hash is deleted and no thread is used. Other tasks run RQ's way.
        """
        since = timezone.now()
        lean = [j.func_name == TASK and len(j.args) == 1 for j, _ in batch]
        claimed: dict[str, Job] = {}
        if any(lean):
            ids = [str(j.args[0]) for (j, _), ours in zip(batch, lean, strict=True) if ours]
            try:
                claimed = {str(row.pk): row for row in self.job_threads.commits.run_alone(Job.claim, ids, self.name)}
            except Exception:
                # Nothing was claimed: put them back in front of their queues, in order, and pause.
                log.exception("claiming jobs failed; putting them back", extra={"jobs": len(ids)})
                close_old_connections()  # a broken connection is replaced on the next try
                self.push_back([entry for entry, ours in zip(batch, lean, strict=True) if ours])
                batch = [entry for entry, ours in zip(batch, lean, strict=True) if not ours]
                lean = [False] * len(batch)
                time.sleep(1.0)
        skipped = []
        for (job, queue), ours in zip(batch, lean, strict=True):
            row = claimed.pop(str(job.args[0]), None) if ours else None
            if ours and row is None:
                skipped.append(job)
                continue
            # The RQ job's timeout is the job's own plus RQ_TIMEOUT_GRACE_S; past the job's own
            # deadline plus WORKER_STUCK_GRACE_S the watcher writes the call off.
            deadline_s = max((job.timeout or self.queue_class.DEFAULT_TIMEOUT) - RQ_TIMEOUT_GRACE_S, 1)
            self.job_threads.submit(
                Running(
                    rq_job=job,
                    queue=queue,
                    job_id=str(job.args[0]) if job.args else job.id,
                    timeout_s=deadline_s + float(settings.WORKER_STUCK_GRACE_S),
                    rank=self._rank.get(queue.name, len(self._rank)),
                    job=row,
                    since=since,
                )
            )
        if skipped:
            log.info("jobs not claimable; skipped", extra={"jobs": [str(j.args[0]) for j in skipped]})
            try:
                self.connection.delete(*(j.key for j in skipped))
            except RedisError as exc:
                log.warning("RQ job hashes not deleted", extra={"error": str(exc)})

    def take_waiting(self, n: int) -> list[tuple[RQJob, Queue]]:
        """Pop up to ``n`` waiting jobs, highest-priority queue first (a worker killed right after
        this leaves them ``queued`` in the database and on no queue: the reconciler pushes them again)."""
        taken: list[tuple[RQJob, Queue]] = []
        for queue in self.queues:
            if len(taken) >= n:
                break
            ids = self.connection.lpop(queue.key, n - len(taken))
            if not ids:
                continue
            ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
            for rq_job in self.job_class.fetch_many(ids, connection=self.connection, serializer=self.serializer):
                if rq_job is not None:  # deleted since it was queued: RQ's own dequeue skips those too
                    taken.append((rq_job, queue))
        return taken

    def push_back(self, taken: list[tuple[RQJob, Queue]]) -> None:
        """Put popped jobs back in front of their queues, in the order they were taken."""
        for rq_job, queue in reversed(taken):
            queue.push_job_id(rq_job.id, at_front=True)

    def _perform_entry(self, entry: Running) -> None:
        if entry.job is None:  # not our task: RQ's own way, with its execution record
            entry.execution = self.prepare_execution(entry.rq_job)
            self.perform_job(entry.rq_job, entry.queue, entry.execution)
        else:
            self.perform_lean(entry)

    def perform_lean(self, entry: Running) -> None:
        """Our own task without RQ's per-job bookkeeping: the database already keeps all of it.

        RQ's started/finished registries, execution records and result storage cost more per job
        than the job itself when the job is short (P5), and duplicate what the Job row holds
        (state, worker, attempts, timings, result); crash recovery is our heartbeat, not RQ's
        started registry. So: run the task (the main thread claimed the row), record the figures,
        delete the RQ job hash (the last two through the write-behind buffer: summed, and sent by
        the watcher a moment later).

        A success is written after the thread moves on (``inflight.write_batched``): the backend
        call is over, so the slot is, and the commit and the figures follow in the writer.
        """
        job, queue, job_id = entry.rq_job, entry.queue, entry.job_id
        buffer = self.job_threads.write_behind
        if not tracing.ENABLED:  # a span must carry the outcome: with tracing on, the thread waits for it
            entry.after_outcome = lambda: record_run(job_id, queue.name, entry.since, row=entry.job, pipe=buffer)
        with tracing.job_span(job.meta, job_id=job_id, queue=queue.name, worker=self.name, since=entry.since) as span:
            try:
                run_claimed(entry.job, self.name)
            except Exception:  # the task records adapter crashes itself; reaching here is our bug
                log.exception("job task crashed", extra={"job_id": job_id})
            finally:
                buffer.delete(job.key)
            if not entry.outcome_deferred:
                record_run(job_id, queue.name, entry.since, span, row=entry.job, pipe=buffer)

    # --- RQ's own per-job Redis writes, trimmed -----------------------------------------------------
    HEARTBEAT_EVERY_S = 1.0

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ refreshes its worker key about four times per job (12 commands); once a second does.

        Its TTL is minutes (``worker_ttl``); our own liveness key is the one crash recovery reads.
        A call with an explicit timeout or pipeline (RQ's job bookkeeping) always goes through.
        """
        now = time.monotonic()
        if timeout is None and pipeline is None and now - getattr(self, "_beat_at", -1e9) < self.HEARTBEAT_EVERY_S:
            return
        self._beat_at = now
        super().heartbeat(timeout, pipeline)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """Write the state only when it changes (RQ writes it twice per job)."""
        if pipeline is None and state == getattr(self, "_state", None):
            return
        super().set_state(state, pipeline)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        self._waiting_for_job = True
        try:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        finally:
            self._waiting_for_job = False
        if self.job_threads is not None and self.job_threads.busy:
            self.set_state(WorkerStatus.BUSY)  # RQ marked us idle while it waited; jobs are still running
        return result

    # --- shutdown ---------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        """First SIGTERM/SIGINT: stop taking jobs. Only a wait for a job is interrupted at once;
        anywhere else the loop sees the flag after its current step (no dequeued job is dropped)."""
        self._stop_requested = True
        self.set_shutdown_requested_date()
        if self._waiting_for_job:
            raise StopRequested()

    def teardown(self) -> None:
        """Before RQ deregisters us: let running jobs finish (within the grace on a stop), re-queue the rest."""
        threads = self.job_threads
        if threads is not None:
            try:
                if self._stop_requested:
                    self.return_waiting()
                grace = float(settings.WORKER_SHUTDOWN_GRACE_S) if self._stop_requested else None
                if threads.busy:
                    self.set_state("stopping" if self._stop_requested else WorkerStatus.BUSY)
                    log.info("waiting for running jobs", extra={"worker": self.name, "jobs": threads.busy})
                if not threads.wait_idle(grace):
                    self.requeue_running("shut down")
            except SystemExit:
                self.requeue_running("stopped by a second signal")  # cold stop: hand the jobs back now
                raise
            finally:
                threads.stop()
        super().teardown()

    def return_waiting(self) -> int:
        """Hand the claimed jobs no thread has started back to their queues (shutdown); returns how many."""
        entries = self.job_threads.take_back_waiting()
        return self._requeue(entries, "shut down before starting the job")

    def requeue_running(self, why: str) -> int:
        """Put the jobs still running here back on their queues; returns how many."""
        entries = self.job_threads.snapshot()
        for entry in entries:
            self.job_threads.forget(entry)
        grace = settings.WORKER_SHUTDOWN_GRACE_S
        return self._requeue(entries, f"{why} before the job finished (grace {grace:g}s)")

    def _requeue(self, entries: list[Running], why: str) -> int:
        """``running -> queued`` (attempt ``interrupted``) and enqueue again, for each job still ours."""
        close_old_connections()
        requeued = 0
        for entry in entries:
            job = Job.objects.filter(pk=entry.job_id, state=JobState.RUNNING, worker=self.name).first()
            if job is None:
                continue  # finished (or canceled) at the last moment
            if job.requeue_lost(f"worker {self.name} {why}; re-queued"):
                if entry.execution is not None:
                    with self.connection.pipeline() as pipe:
                        self.cleanup_execution(entry.rq_job, pipeline=pipe, execution=entry.execution)
                        pipe.execute()
                queueing.enqueue(job)
                requeued += 1
        if requeued:
            log.warning("re-queued jobs at shutdown", extra={"worker": self.name, "jobs": requeued, "why": why})
        return requeued

    # --- what the admin sees ----------------------------------------------------------------------
    def in_flight(self) -> int:
        """Jobs running in this process now."""
        return self.job_threads.busy if self.job_threads is not None else 0

    def unwritten(self) -> int:
        """Finished jobs whose results wait for the database to come back."""
        threads = self.job_threads
        return threads.commits.retrying if threads is not None else 0

    def on_beat(self) -> None:
        """Each heartbeat: renew this process's backend slots and publish its status."""
        capacity.renew_held()
        self.publish_status()

    def publish_status(self, *, gone: bool = False) -> None:
        try:
            if gone:
                status.remove(self.name)
                return
            threads = self.job_threads
            busy = self.in_flight()
            state = "stopping" if self._stop_requested else ("busy" if busy else "idle")
            status.publish(
                status.WorkerStatus(
                    name=self.name,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    queues=self.queue_names(),
                    state=state,
                    in_flight=busy,
                    max_concurrency=self.slots,
                    jobs_done=threads.done if threads is not None else 0,
                    unwritten=self.unwritten(),
                    started_at=self._started,
                    updated_at=timezone.now().isoformat(),
                )
            )
        except Exception as exc:  # the admin's view must never stop a worker
            log.warning("worker status not published", extra={"worker": self.name, "error": str(exc)})

    # --- observability hook (issue 7): trace context in, fleet metrics out -------------------
    def perform_job(self, job: RQJob, queue: Queue, execution: Execution) -> bool:
        """Run the job inside a span continuing the request's trace, then record what it did.

        Metrics and attempt spans are read back from the Job/JobAttempt rows (two PK-indexed
        reads) instead of being reported by the task, so they stay right whatever the task does.
        A failure here is logged and never changes the job's outcome.
        """
        job_id = str(job.args[0]) if job.args else job.id
        since = timezone.now()
        with tracing.job_span(job.meta, job_id=job_id, queue=queue.name, worker=self.name) as span:
            ok = super().perform_job(job, queue, execution)
            record_run(job_id, queue.name, since, span)
        return ok


def tune_gc(gen0: int) -> None:
    """Freeze what is loaded now (it lives as long as the process) and collect the youngest
    generation every ``gen0`` allocations (``WORKER_GC_GEN0``; 0 leaves Python's defaults)."""
    if gen0 <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)


def record_run(
    job_id: str, queue: str, since: datetime, span: Any = None, row: Any = None, pipe: WriteBehind | None = None
) -> None:
    """Fleet metrics (and attempt spans under ``span``) for what one execution of ``job_id`` did.

    For worker classes that run jobs outside ``perform_job`` (the GPU batcher): call it once per
    job after its outcome is written, with ``since`` taken before the job was claimed. ``row``: the
    Job instance the task finished with, when there is one (its fields and attempts are current).
    ``pipe``: buffer the figures there instead of sending them now.
    """
    try:
        run = metrics.read_run(job_id, queue, since, row=row)
        if run is not None:
            metrics.record_run(run, pipe=pipe)
            tracing.add_attempt_spans(span, run)
    except Exception as exc:  # observability must not fail a job
        log.warning("job metrics not recorded", extra={"job_id": job_id, "error": f"{type(exc).__name__}: {exc}"})
