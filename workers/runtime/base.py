"""What both of our worker runtimes share: the RQ worker around our own task.

``manage.py rqworker`` runs a subclass of :class:`BaseWorker` (``settings.RQ['WORKER_CLASS']``:
``workers.runtime.threaded.ThreadedWorker``; the GPU hosts pass ``--worker-class
workers.runtime.gpu.GpuWorker``). The base does what does not depend on how jobs run:

- **No fork.** A ``SimpleWorker``: forking costs most of RQ's per-job time, drops the process's
  warm DB and Redis connections, and breaks CUDA. The JSON serializer always (``rqworker`` passes
  pickle by default; our RQ jobs carry only a job id), and ``host.pid`` names, so a job's
  ``worker`` says where it ran.
- **Our own task without RQ's per-job bookkeeping.** RQ's started/finished registries, execution
  records and result storage cost more per job than a short job itself, and duplicate what the Job
  row holds (state, worker, attempts, timings, result); crash recovery is our heartbeat, not RQ's
  started registry. So a worker claims the rows of the jobs it pops (``claim_or_put_back``: one
  statement; if the database refuses, they go back in front of their queues), runs them, and deletes
  each RQ job hash through the write-behind buffer. Any other RQ job runs RQ's way (``run_other``).
- **Taking jobs fairly**: RQ's loop dequeues through ``FairDequeue`` (``jobs.fair_queue``: priority,
  then tenants by weight, with aging); ``take_waiting`` takes more the same way, ``push_back``
  returns them to the exact places they had.
- **Grace and stop.** The first SIGTERM/SIGINT stops taking work; running jobs get
  ``WORKER_SHUTDOWN_GRACE_S``; what is left is re-queued (``requeue_interrupted``: ``running ->
  queued``, the attempt closed as ``interrupted``). A second signal re-queues at once.
- **Liveness and status**: a heartbeat thread (``workers.fleet.heartbeat``) beats the liveness key,
  renews this process's backend slots and publishes the status the admin shows.
- **Webhooks**: ``WEBHOOK_SENDER_THREADS`` threads send the deliveries that are due
  (``webhooks.sender``), beside the jobs and never in their way; at the end they finish what they send.
- **RQ's own Redis writes, trimmed**: its worker key once a second, its state only when it changes.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.exceptions import DequeueTimeout, StopRequested
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from jobs import fair_queue, queueing
from jobs.models import Job
from orchestrator_site import tracing
from routing import capacity
from routing.models import Backend
from webhooks.sender import Sender
from workers.execution.run_figures import record_expired, record_run
from workers.fleet import status
from workers.fleet.heartbeat import Heartbeat
from workers.runtime.write_behind import WriteBehind

log = logging.getLogger(__name__)

# The task paths our workers run as their own: today's, and the one jobs already in Redis may carry.
OUR_TASKS = frozenset({queueing.TASK, *queueing.LEGACY_TASKS})
# After the database refused a claim: a pause before the next dequeue, so a database that is away
# is not hammered by every worker at RQ's pace.
CLAIM_REFUSED_PAUSE_S = 1.0


def is_our_task(rq_job: RQJob) -> bool:
    """An RQ job of ours carries only the job id (``jobs.queueing.enqueue``)."""
    return rq_job.func_name in OUR_TASKS and len(rq_job.args) == 1


def delivery_id(rq_job: RQJob) -> str:
    """The Job id an RQ job delivers (its own id for an RQ job that is not ours)."""
    return str(rq_job.args[0]) if rq_job.args else rq_job.id


@dataclass(eq=False)
class Delivery:
    """One RQ job handed to this worker: its queue, then (our own task, once claimed) our row."""

    rq_job: RQJob
    queue: Queue
    job_id: str
    since: datetime = field(default_factory=timezone.now)  # before the claim: what the run's figures cover
    # The row as the claim returned it; at the end, as the run left it (its figures are read from memory).
    job: Job | None = None

    @property
    def backend(self) -> Backend:
        assert self.job is not None and self.job.backend is not None
        return self.job.backend


def taken_entry(rq_job: RQJob, queue: Queue) -> fair_queue.Taken:
    """Where a taken job came from (set by ``take``); a job that came another way goes back to RQ's list."""
    return getattr(rq_job, "fair_entry", None) or fair_queue.Taken(queue.name, rq_job.id, "", "")


def take(
    queues: list[Queue], n: int, connection: Any, job_class: type[RQJob], serializer: Any
) -> list[tuple[RQJob, Queue]]:
    """Up to ``n`` jobs from the fair queue with their RQ hashes; fewer only when the queues ran dry.

    Entries whose hash is gone (deleted since they were queued) are skipped, as RQ's own dequeue
    skips them, and the take goes on: a skipped entry must not read as an empty queue, which would
    end a burst worker or send an idle one to wait for a bell while jobs are still queued.
    """
    by_name = {q.name: q for q in queues}
    names = [q.name for q in queues]
    taken: list[tuple[RQJob, Queue]] = []
    while len(taken) < n:
        entries = fair_queue.take(names, n - len(taken), client=connection)
        if not entries:
            break
        rq_jobs = job_class.fetch_many([e.job_id for e in entries], connection=connection, serializer=serializer)
        for entry, rq_job in zip(entries, rq_jobs, strict=True):
            if rq_job is not None:
                rq_job.fair_entry = entry
                taken.append((rq_job, by_name[entry.queue]))
    return taken


class FairDequeue:
    """Mixed into the worker's queue class: RQ's loop takes its next job from the fair queue.

    RQ's ``dequeue_any`` pops the first of the worker's lists (BLPOP); here the fair queue's take
    decides, and an idle worker blocks on the queues' bells (short waits, below the Redis socket
    timeout) until a push rings one or RQ's dequeue timeout passes.
    """

    BELL_WAIT_S = 2.0

    @classmethod
    def dequeue_any(
        cls,
        queues: Any,
        timeout: int | None,
        connection: Any,
        job_class: Any = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[RQJob, Queue] | None:
        queues = list(queues)
        names = [q.name for q in queues]
        until = None if not timeout else time.monotonic() + timeout
        while True:
            taken = take(queues, 1, connection, job_class or RQJob, serializer)
            if taken:
                return taken[0]
            if timeout is None:  # burst mode: never block
                return None
            left = cls.BELL_WAIT_S if until is None else until - time.monotonic()
            if left <= 0:
                raise DequeueTimeout(timeout, names)
            fair_queue.wait_for_push(names, min(left, cls.BELL_WAIT_S), client=connection)


_fair_classes: dict[type, type] = {}


def fair_queue_class(queue_class: type[Queue]) -> type[Queue]:
    """``queue_class`` (django-rq's, or a ``--queue-class``) with the fair dequeue."""
    if issubclass(queue_class, FairDequeue):
        return queue_class
    fair = _fair_classes.get(queue_class)
    if fair is None:
        fair = _fair_classes[queue_class] = type(f"Fair{queue_class.__name__}", (FairDequeue, queue_class), {})
    return fair


class NoDeathPenalty(BaseDeathPenalty):
    """RQ's SIGALRM death penalty works only in the main thread, and our jobs may run in others.

    Deadlines are ours instead: the job's own (``workers.execution.retry.Deadline``, passed to the
    adapter as its timeout), the job threads' hard deadline and the GPU batch's expiry.
    """

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class BaseWorker(SimpleWorker):
    """The no-fork RQ worker both runtimes extend; a subclass implements ``execute_job`` and ``claim_rows``."""

    death_penalty_class = NoDeathPenalty
    # RQ refreshes its worker key about four times per job; once a second does.
    HEARTBEAT_EVERY_S = 1.0
    # After a lost Redis connection RQ waits 1, 2, 4... up to 60 s between tries; a Sentinel failover
    # ends in seconds, so a worker that doubled its wait through it would sit idle long after. One try
    # every 2 s at most costs a down Redis nothing.
    max_connection_wait_time = 2.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["serializer"] = JSONSerializer
        # RQ's Worker.all()/find_by_key() pass the stored name positionally (second argument).
        if len(args) < 2:
            kwargs["name"] = kwargs.get("name") or f"{socket.gethostname()}.{os.getpid()}"
        super().__init__(*args, **kwargs)
        self.queue_class = fair_queue_class(self.queue_class)
        # Finished jobs' figures and RQ hash deletes, summed and sent in one round trip now and then.
        self.write_behind = WriteBehind()
        self._waiting_for_job = False
        self._stop_at: float | None = None
        self._beat_at = -1e9
        self._started = timezone.now().isoformat()

    # --- what a runtime tells about itself -----------------------------------------------------------
    @property
    def slots(self) -> int:
        """How many jobs this worker runs at once (the admin's ``max_concurrency``)."""
        return 1

    def in_flight(self) -> int:
        """Jobs running in this process now."""
        return 0

    def jobs_done(self) -> int:
        return 0

    def unwritten(self) -> int:
        """Finished jobs whose results wait for the database to come back."""
        return 0

    # --- the loop ---------------------------------------------------------------------------------
    def work(self, *args: Any, **kwargs: Any) -> bool:
        """Beat a liveness key while working, so the jobs of a killed worker are recovered in seconds."""
        tune_gc(int(settings.WORKER_GC_GEN0))
        if kwargs.get("logging_level") in (None, "INFO"):
            # django-rq's rqworker passes INFO unless -v 0 (WARNING) or -v 2 (DEBUG) was given, and RQ
            # sets it on rq.worker: without this, LOG_LEVEL would not reach the worker's own log lines.
            kwargs["logging_level"] = settings.LOG_LEVEL
        beat = Heartbeat(self.name, on_beat=self.on_beat)
        beat.start()
        webhooks = Sender(self.name)
        webhooks.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            webhooks.stop()
            beat.stop()
            self.write_behind.flush(self.connection)
            self.publish_status(gone=True)

    def claim_rows(self, ids: list[str]) -> list[Job]:
        """``Job.claim(ids, self.name)`` the way this runtime writes (one statement)."""
        raise NotImplementedError

    def claim_or_put_back(self, deliveries: list[Delivery]) -> bool:
        """Claim the rows of our own tasks' ``deliveries`` in one statement, setting each ``job``.

        A delivery left without a row lost its claim (another delivery won, canceled or deleted
        meanwhile). If the database refuses the claim, nothing was claimed: the jobs go back in
        front of their queues, in order, the worker pauses, and this returns False.
        """
        ids = [d.job_id for d in deliveries]
        try:
            rows = {str(row.pk): row for row in self.claim_rows(ids)}
        except Exception:
            log.exception("claiming jobs failed; putting them back", extra={"jobs": len(ids)})
            close_old_connections()  # a broken connection is replaced on the next try
            self.push_back([(d.rq_job, d.queue) for d in deliveries])
            time.sleep(CLAIM_REFUSED_PAUSE_S)
            return False
        for d in deliveries:
            d.job = rows.pop(d.job_id, None)
        return True

    def drop_unclaimed(self, deliveries: list[Delivery]) -> None:
        """Deliveries that lost their claim use nothing: their RQ hashes go with the next flush.

        A job is not claimable past its queue timeout: this worker found it, so it expires it.
        """
        if deliveries:
            log.info("jobs not claimable; skipped", extra={"jobs": [d.job_id for d in deliveries]})
            self.write_behind.delete(*(d.rq_job.key for d in deliveries))
            try:
                record_expired(Job.expire_due([d.job_id for d in deliveries if is_our_task(d.rq_job)]))
            except Exception:  # the reconciler's pass expires them too
                log.exception("expiring jobs failed", extra={"jobs": len(deliveries)})

    def take_waiting(self, n: int) -> list[tuple[RQJob, Queue]]:
        """Take up to ``n`` waiting jobs the way the fair queue serves them (priority, then tenants by
        weight, with aging). A worker killed right after this leaves them ``queued`` in the database
        and on no queue: the reconciler pushes them again."""
        return take(self.queues, n, self.connection, self.job_class, self.serializer)

    def push_back(self, taken: list[tuple[RQJob, Queue]]) -> None:
        """Put taken jobs back where they were (their tenant's sub-queue, at their enqueue time)."""
        fair_queue.put_back((taken_entry(rq_job, queue) for rq_job, queue in taken), client=self.connection)

    def finish_own(self, d: Delivery, span: Any = None) -> None:
        """Our own task's run is over: its RQ hash goes, its figures are recorded (both buffered)."""
        self.write_behind.delete(d.rq_job.key)
        record_run(d.job_id, d.queue.name, d.since, span, row=d.job, pipe=self.write_behind)

    def run_other(self, rq_job: RQJob, queue: Queue) -> None:
        """An RQ job that is not our task: the ``SimpleWorker`` way, in this thread."""
        self.perform_job(rq_job, queue, self.prepare_execution(rq_job))

    def perform_job(self, job: RQJob, queue: Queue, execution: Execution) -> bool:
        """RQ's way, inside a span continuing the request's trace, then the run's figures.

        The figures and attempt spans are read back from the rows, so they stay right whatever the
        task did. A failure there is logged and never changes the job's outcome.
        """
        job_id = delivery_id(job)
        since = timezone.now()
        with tracing.job_span(job.meta, job_id=job_id, queue=queue.name, worker=self.name) as span:
            ok = super().perform_job(job, queue, execution)
            record_run(job_id, queue.name, since, span)
        return ok

    # --- shutdown ---------------------------------------------------------------------------------
    def grace_over(self) -> bool:
        """A stop was asked ``WORKER_SHUTDOWN_GRACE_S`` ago: what still runs goes back to its queue."""
        return self._stop_at is not None and time.monotonic() - self._stop_at >= float(settings.WORKER_SHUTDOWN_GRACE_S)

    def requeue_interrupted(self, job: Job, why: str) -> bool:
        """``running -> queued`` (the attempt closed as ``interrupted``) and on its queue again, when
        ``job`` is still ours; the same RQ job id, so its hash is reused."""
        if not job.requeue_lost(f"worker {self.name} {why}; re-queued"):
            return False
        queueing.enqueue(job)
        return True

    def log_requeued(self, requeued: int, why: str) -> None:
        if requeued:
            log.warning("re-queued jobs at shutdown", extra={"worker": self.name, "jobs": requeued, "why": why})

    # --- RQ internals: the one place we touch them (checked against rq 3.0.0) ---------------------
    # RQ has no public hook for "stop taking jobs, but let the ones running finish" in a worker that
    # runs jobs in its own process: its ``_shutdown`` raises StopRequested unless the worker's state
    # is busy, which would end the loop with claimed jobs in hand. We override it and read the flag
    # its loop reads.
    @property
    def stop_requested(self) -> bool:
        """A SIGTERM/SIGINT asked this worker to stop taking jobs."""
        return self._stop_requested

    def _shutdown(self) -> None:
        """First SIGTERM/SIGINT: stop taking jobs. Only a wait for a job is interrupted at once;
        anywhere else the loop sees the flag after its current step (no dequeued job is dropped)."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self._stop_requested = True
        self.set_shutdown_requested_date()
        if self._waiting_for_job:
            raise StopRequested()

    # --- RQ's own per-job Redis writes, trimmed -----------------------------------------------------
    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ refreshes its worker key about four times per job (12 commands); once a second does.

        Its TTL is minutes (``worker_ttl``); our own liveness key is the one crash recovery reads.
        A call with an explicit timeout or pipeline (RQ's job bookkeeping) always goes through.
        """
        now = time.monotonic()
        if timeout is None and pipeline is None and now - self._beat_at < self.HEARTBEAT_EVERY_S:
            return
        self._beat_at = now
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        with redis_unreachable_waited_out(self.name, self.max_connection_wait_time):
            super().heartbeat(timeout, pipeline)

    # RQ's loop quits on a Redis timeout (or any error) raised outside its dequeue: a network cut or a
    # failover longer than the socket timeout would end the worker, jobs in hand. Its few Redis calls
    # there are waited out instead; the dequeue already retries on its own.
    def check_for_suspension(self, burst: bool) -> None:
        with redis_unreachable_waited_out(self.name, self.max_connection_wait_time):
            super().check_for_suspension(burst)

    def run_maintenance_tasks(self) -> None:
        with redis_unreachable_waited_out(self.name, self.max_connection_wait_time):
            super().run_maintenance_tasks()

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """Write the state only when it changes (RQ writes it twice per job)."""
        if pipeline is None and state == self.get_state():
            return
        if pipeline is not None:
            super().set_state(state, pipeline)
            return
        # RQ sets IDLE before its dequeue, outside the dequeue's own reconnect loop: a Redis failover
        # (no primary for a moment) raised from here ends RQ's loop ("unhandled exception, quitting").
        with redis_unreachable_waited_out(self.name, self.max_connection_wait_time):
            super().set_state(state, pipeline)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        self._waiting_for_job = True
        try:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        finally:
            self._waiting_for_job = False
        if self.in_flight():
            self.set_state(WorkerStatus.BUSY)  # RQ marked us idle while it waited; jobs are still running
        return result

    # --- what the admin sees ----------------------------------------------------------------------
    def on_beat(self) -> None:
        """Each heartbeat: renew this process's backend slots and publish its status."""
        capacity.renew_held()
        self.publish_status()

    def publish_status(self, *, gone: bool = False) -> None:
        try:
            if gone:
                status.remove(self.name)
                return
            busy = self.in_flight()
            state = "stopping" if self.stop_requested else ("busy" if busy else "idle")
            status.publish(
                status.WorkerReport(
                    name=self.name,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    queues=self.queue_names(),
                    state=state,
                    in_flight=busy,
                    max_concurrency=self.slots,
                    jobs_done=self.jobs_done(),
                    unwritten=self.unwritten(),
                    started_at=self._started,
                    updated_at=timezone.now().isoformat(),
                )
            )
        except Exception as exc:  # the admin's view must never stop a worker
            log.warning("worker status not published", extra={"worker": self.name, "error": str(exc)})


@contextlib.contextmanager
def redis_unreachable_waited_out(worker: str, wait_s: float) -> Iterator[None]:
    """Log a lost or timed-out Redis connection and wait ``wait_s`` instead of raising it."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        log.warning("redis unreachable; waiting", extra={"worker": worker, "error": str(exc)})
        time.sleep(wait_s)


def tune_gc(gen0: int) -> None:
    """Freeze what is loaded now (it lives as long as the process) and collect the youngest
    generation every ``gen0`` allocations (``WORKER_GC_GEN0``; 0 leaves Python's defaults)."""
    if gen0 <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)
