"""The worker class behind ``manage.py rqworker`` (``settings.RQ['WORKER_CLASS']``): job threads.

One process runs up to ``MAX_CONCURRENCY`` jobs at once in a pool of threads
(``workers.runtime.job_threads``); RQ's loop in the main thread dequeues only when the threads have
room (free slots, plus a few claimed jobs waiting), in priority order, and a free thread takes the
highest-priority waiting job. Database writes go through one writer thread
(``workers.runtime.group_commit``), which each job run reaches through its ``DeliveryWriter``.

Shutdown (SIGTERM or SIGINT, as Kubernetes and systemd send it): stop taking jobs, hand the
claimed jobs no thread started back at once, let the running ones finish for
``WORKER_SHUTDOWN_GRACE_S``, then put the rest back on their queues and exit 0. A second signal
re-queues at once. A job whose thread outlives the re-queue cannot write an outcome: the process
exits, and the fenced compare-and-set would refuse it anyway.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.worker import WorkerStatus

from jobs.models import Job, JobState
from jobs.queueing import RQ_TIMEOUT_GRACE_S
from orchestrator_site import tracing
from workers.execution.job_run import RunContext, run_claimed
from workers.execution.run_figures import record_run
from workers.runtime.base import BaseWorker, delivery_id, is_our_task
from workers.runtime.job_threads import DeliveryWriter, JobThreads, ThreadedDelivery

log = logging.getLogger(__name__)


class ThreadedWorker(BaseWorker):
    """Runs jobs in threads of the worker process itself (I/O-bound backends: Ollama, OpenAI, dev)."""

    max_concurrency: int | None = None  # None: settings.MAX_CONCURRENCY

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job_threads: JobThreads | None = None  # made on the first job
        self._rank: dict[str, int] = {}

    @property
    def slots(self) -> int:
        return int(self.max_concurrency or settings.MAX_CONCURRENCY)

    @property
    def prefetch(self) -> int:
        return int(settings.WORKER_PREFETCH)

    def in_flight(self) -> int:
        return self.job_threads.busy if self.job_threads is not None else 0

    def jobs_done(self) -> int:
        return self.job_threads.done if self.job_threads is not None else 0

    def unwritten(self) -> int:
        return self.job_threads.commits.retrying if self.job_threads is not None else 0

    def execute_job(self, job: RQJob, queue: Queue) -> None:
        """Hand ``job`` to the job threads, with as many more waiting jobs as they have room for.

        RQ's loop hands us one job per blocking dequeue; we take more at once (one call of the fair
        queue's take script, and one fetch) up to the threads' room (``slots`` running plus a few
        waiting), claim them all in one statement, and return once there is room again.
        """
        if self.job_threads is None:
            self.job_threads = JobThreads(
                self.slots, self.perform, self.name, prefetch=self.prefetch, write_behind=self.write_behind
            )
            self._rank = {q.name: i for i, q in enumerate(self.queues)}
        taken = [(job, queue)]
        room = self.job_threads.room - 1
        if room > 0 and not self.stop_requested:
            taken += self.take_waiting(room)
        self.hand_over(taken)
        while not self.job_threads.wait_for_slot(timeout=5.0) and not self.stop_requested:
            self.heartbeat()  # every slot is busy: keep RQ's worker key alive meanwhile

    def hand_over(self, taken: list[tuple[RQJob, Queue]]) -> None:
        """Claim our own tasks' jobs (through the writer thread on SQLite, which has one writer at a
        time; from this thread on PostgreSQL), then hand every job to the threads. A job that cannot
        be claimed is dropped without using a thread. Other RQ jobs run RQ's way in a thread."""
        since = timezone.now()
        deliveries = [
            ThreadedDelivery(
                rq_job,
                queue,
                delivery_id(rq_job),
                since=since,
                # The RQ job's timeout is the job's own plus RQ_TIMEOUT_GRACE_S; past the job's own
                # deadline plus WORKER_STUCK_GRACE_S the watcher writes the call off.
                timeout_s=max((rq_job.timeout or self.queue_class.DEFAULT_TIMEOUT) - RQ_TIMEOUT_GRACE_S, 1)
                + float(settings.WORKER_STUCK_GRACE_S),
                rank=self._rank.get(queue.name, len(self._rank)),
            )
            for rq_job, queue in taken
        ]
        ours = [d for d in deliveries if is_our_task(d.rq_job)]
        if ours and not self.claim_or_put_back(ours):
            deliveries = [d for d in deliveries if not is_our_task(d.rq_job)]
            ours = []
        unclaimed = {id(d) for d in ours if d.job is None}
        for d in deliveries:
            if id(d) not in unclaimed:
                self.job_threads.submit(d)
        self.drop_unclaimed([d for d in ours if d.job is None])

    def claim_rows(self, ids: list[str]) -> list[Job]:
        return self.job_threads.commits.run_in_own_transaction(Job.claim, ids, self.name)

    def perform(self, d: ThreadedDelivery) -> None:
        """In a job thread: our own task, or RQ's way for any other RQ job (with its execution record)."""
        if d.job is None:
            d.execution = self.prepare_execution(d.rq_job)
            self.perform_job(d.rq_job, d.queue, d.execution)
        else:
            self.run_own(d)

    def run_own(self, d: ThreadedDelivery) -> None:
        """Run our claimed task, then record its figures and drop its RQ hash (``BaseWorker.finish_own``).

        A success is written after the thread moves on (``DeliveryWriter.run_batched``): the backend
        call is over, so the slot is, and the commit and the figures follow in the writer. With
        tracing on, the thread waits for the outcome: the span must carry it.
        """
        if not tracing.ENABLED:
            d.after_outcome = lambda: record_run(d.job_id, d.queue.name, d.since, row=d.job, pipe=self.write_behind)
        ctx = RunContext(self.name, DeliveryWriter(self.job_threads.commits, d), d.cancel)
        with tracing.job_span(
            d.rq_job.meta, job_id=d.job_id, queue=d.queue.name, worker=self.name, since=d.since
        ) as span:
            try:
                run_claimed(d.job, ctx)
            except Exception:  # the run records adapter crashes itself; reaching here is our bug
                log.exception("job task crashed", extra={"job_id": d.job_id})
            if d.outcome_deferred:
                self.write_behind.delete(d.rq_job.key)
            else:
                self.finish_own(d, span)

    # --- shutdown ---------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Before RQ deregisters us: let running jobs finish (within the grace on a stop), re-queue the rest."""
        threads = self.job_threads
        if threads is not None:
            try:
                if self.stop_requested:
                    self.return_waiting()
                grace = float(settings.WORKER_SHUTDOWN_GRACE_S) if self.stop_requested else None
                if threads.busy:
                    self.set_state("stopping" if self.stop_requested else WorkerStatus.BUSY)
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
        return self._requeue(self.job_threads.take_back_waiting(), "shut down before starting the job")

    def requeue_running(self, why: str) -> int:
        """Put the jobs still running here back on their queues; returns how many."""
        deliveries = self.job_threads.snapshot()
        for d in deliveries:
            self.job_threads.forget(d)
        grace = settings.WORKER_SHUTDOWN_GRACE_S
        return self._requeue(deliveries, f"{why} before the job finished (grace {grace:g}s)")

    def _requeue(self, deliveries: list[ThreadedDelivery], why: str) -> int:
        """``requeue_interrupted`` for each job still ours (read again: its thread may have moved it)."""
        close_old_connections()
        requeued = 0
        for d in deliveries:
            job = Job.objects.filter(pk=d.job_id, state=JobState.RUNNING, worker=self.name).first()
            if job is None:
                continue  # finished (or canceled) at the last moment
            if self.requeue_interrupted(job, why):
                if d.execution is not None:
                    with self.connection.pipeline() as pipe:
                        self.cleanup_execution(d.rq_job, pipeline=pipe, execution=d.execution)
                        pipe.execute()
                requeued += 1
        self.log_requeued(requeued, why)
        return requeued
