"""Many jobs in flight in one worker process: a fixed pool of job threads, their writer, and a watcher.

Why threads: the API backends (Ollama, OpenAI-compatible, dev) spend a job waiting on a socket,
so one process can keep ``MAX_CONCURRENCY`` calls going; the GIL is released while they wait.
A fixed pool (not a thread per job) keeps each thread's database connection open across jobs.

The worker's main thread stays RQ's loop: it dequeues (``high`` before ``normal`` before ``low``),
claims what it popped in one transaction, and hands the jobs over until ``size`` are running and
a few more wait here. A thread that finishes takes the highest-priority waiting job at once,
instead of idling through the main thread's next round of Redis and database calls (with short
jobs, that round would hold a large share of the slots idle). How many may wait adapts to how long jobs run: no more
than ``size`` threads finish in ``PREFETCH_WAIT_S`` on average (and at most ``prefetch``), so a
waiting job starts within about that long of its claim, and with long jobs nothing waits at all
(a job must not sit behind a long one here while another worker is idle). On shutdown the
waiting jobs are handed back (re-queued) at once; if the process dies they are recovered like
the running ones.

A job's database writes go through its ``DeliveryWriter``: into the process's group commit
(``workers.runtime.group_commit``), one writer thread for every job thread.

The watcher thread (every ``WORKER_WATCH_S``) looks after the running jobs and flushes the
write-behind buffer (``workers.runtime.write_behind``):

- **cancel**: a job canceled while running (``jobs.cancellation``) gets its ``cancel`` event set,
  which stops the backoff and adapters that can stop early;
- **deadline**: a job still running past its hard deadline (its timeout plus
  ``WORKER_STUCK_GRACE_S``: the adapter ignored its own timeout) is marked failed, its backend
  slots are released and its thread is written off: a fresh thread takes its place, and the stuck
  one exits when the call returns (its late result loses the compare-and-set).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django.conf import settings
from django.db import close_old_connections, connection
from redis.exceptions import RedisError
from rq.executions import Execution

from jobs import cancellation
from jobs.models import Job, JobState
from routing import capacity
from workers.runtime.base import Delivery
from workers.runtime.group_commit import GroupCommit
from workers.runtime.write_behind import WriteBehind

log = logging.getLogger(__name__)
T = TypeVar("T")


# How long a claimed job may wait here for a thread, on average (bounds the prefetch).
PREFETCH_WAIT_S = 0.05
# Weight of the latest job in the running average of job times.
RUN_TIME_ALPHA = 0.1


@dataclass(eq=False)
class ThreadedDelivery(Delivery):
    """A delivery handed to this process's threads: waiting for one, then running in it."""

    timeout_s: float = math.inf  # once running: past this, the watcher writes the job off
    rank: int = 0  # its queue's place in the worker's priority order (0 first)
    # None for our own task (no RQ execution record); made as the thread starts another RQ job.
    execution: Execution | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # one RQ job may be delivered twice
    # Run by the writer after a deferred outcome write (``DeliveryWriter``); None: outcomes are waited for.
    after_outcome: Callable[[], None] | None = None
    outcome_deferred: bool = False  # the outcome was handed to the writer: after_outcome will run
    taken: bool = False  # a thread is running it
    abandoned: bool = False
    started: float = field(default_factory=time.monotonic)  # monotonic; reset when a thread takes it
    hard_deadline: float = math.inf  # monotonic, set when a thread takes it


class DeliveryWriter:
    """A job run's writer in a job thread (``workers.execution.job_run.Writer``): through the group commit.

    A ``run_batched`` with ``then`` does not wait when the delivery takes its outcome late
    (``ThreadedDelivery.after_outcome``): it returns None, the thread is free for its next job, and
    ``then`` and the delivery's hook run in the writer once the write is committed. Otherwise it
    waits, calls ``then`` itself and returns the value.
    """

    def __init__(self, commits: GroupCommit, delivery: ThreadedDelivery) -> None:
        self.commits = commits
        self.delivery = delivery

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.commits.run(fn, *args, **kwargs)

    def run_batched(
        self, fn: Callable[[list[Any]], list[T]], item: Any, *, then: Callable[[T], None] | None = None
    ) -> T | None:
        delivery = self.delivery
        if then is not None and delivery.after_outcome is not None:
            hook = delivery.after_outcome
            delivery.outcome_deferred = True

            def done(value: T) -> None:
                then(value)
                hook()

            self.commits.run_batched(fn, item, then=done)
            return None
        value = self.commits.run_batched(fn, item)
        if then is not None:
            then(value)
        return value


class JobThreads:
    """``size`` job threads fed by the worker's main thread, up to ``prefetch`` jobs waiting, and a watcher."""

    def __init__(
        self,
        size: int,
        perform: Callable[[ThreadedDelivery], None],
        worker_name: str,
        prefetch: int = 0,
        write_behind: WriteBehind | None = None,
    ) -> None:
        self.size = size
        self.prefetch = prefetch
        self.perform = perform
        self.worker_name = worker_name
        self.running: dict[str, ThreadedDelivery] = {}  # delivery key -> delivery, waiting or running
        self.done = 0
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int, ThreadedDelivery]] = []  # heap: (rank, arrival, delivery)
        self._arrival = itertools.count()
        self.run_time_s: float | None = None  # running average of how long a job holds a thread
        self._stop = threading.Event()
        self._threads = 0
        self.commits = GroupCommit(f"{worker_name}-commits")
        # The finished jobs' figures and RQ hash deletes, flushed by the watcher.
        self.write_behind = write_behind if write_behind is not None else WriteBehind()
        for _ in range(size):
            self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="job-watcher", daemon=True)
        self._watcher.start()

    # --- slots ------------------------------------------------------------------------------------
    @property
    def busy(self) -> int:
        """Jobs running in a thread now (written-off ones do not count). (The condition's lock is reentrant.)"""
        with self._cond:
            return sum(1 for r in self.running.values() if r.taken and not r.abandoned)

    @property
    def held(self) -> int:
        """Jobs running or waiting here (written-off ones do not count)."""
        with self._cond:
            return sum(1 for r in self.running.values() if not r.abandoned)

    @property
    def waiting_allowed(self) -> int:
        """How many claimed jobs may wait for a thread now: about ``PREFETCH_WAIT_S`` worth of finishes."""
        run_time = self.run_time_s
        if not self.prefetch or run_time is None:
            return 0
        return min(self.prefetch, int(self.size * PREFETCH_WAIT_S / max(run_time, 1e-6)))

    @property
    def room(self) -> int:
        """How many more jobs the main thread may hand over now."""
        return self.size + self.waiting_allowed - self.held

    def submit(self, delivery: ThreadedDelivery) -> None:
        with self._cond:
            self.running[delivery.key] = delivery
            heapq.heappush(self._waiting, (delivery.rank, next(self._arrival), delivery))
            self._cond.notify_all()

    def wait_for_slot(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.room > 0, timeout)

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no job is running or waiting (written-off ones do not count); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.held == 0, timeout)

    def take_back_waiting(self) -> list[ThreadedDelivery]:
        """Remove the claimed jobs no thread has started (shutdown), highest priority first."""
        with self._cond:
            deliveries = [delivery for _, _, delivery in sorted(self._waiting, key=lambda w: w[:2])]
            self._waiting.clear()
            for delivery in deliveries:
                self.running.pop(delivery.key, None)
            self._cond.notify_all()
        return deliveries

    def snapshot(self) -> list[ThreadedDelivery]:
        """The jobs running in a thread now."""
        with self._cond:
            return [r for r in self.running.values() if r.taken]

    def forget(self, delivery: ThreadedDelivery) -> None:
        """Stop tracking ``delivery`` (re-queued at shutdown): its thread's late outcome is fenced off."""
        with self._cond:
            self.running.pop(delivery.key, None)
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        self.commits.stop()
        self.write_behind.flush()

    # --- threads ----------------------------------------------------------------------------------
    def _spawn(self) -> None:
        self._threads += 1
        threading.Thread(target=self._serve, name=f"job-{self._threads}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._stop.is_set())
                if not self._waiting:
                    break  # stopping
                delivery = heapq.heappop(self._waiting)[2]
                delivery.taken = True
                delivery.started = time.monotonic()
                delivery.hard_deadline = delivery.started + delivery.timeout_s
            try:
                self.perform(delivery)
            except Exception:  # perform_job reports job errors itself; this is a bug in our handling
                log.exception("job thread failed", extra={"job_id": delivery.job_id})
            finally:
                took = time.monotonic() - delivery.started
                with self._cond:
                    self.running.pop(delivery.key, None)
                    self.done += 1
                    avg = self.run_time_s
                    self.run_time_s = took if avg is None else avg + RUN_TIME_ALPHA * (took - avg)
                    self._cond.notify_all()
            if delivery.abandoned:
                break  # a replacement thread took this one's place when it was written off
        connection.close()

    # --- the watcher ------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(float(settings.WORKER_WATCH_S)):
            self.write_behind.flush()
            with self._cond:  # running and waiting (a job canceled while waiting must not start)
                deliveries = [r for r in self.running.values() if not r.abandoned]
            if not deliveries:
                continue
            try:
                canceled = cancellation.requested(r.job_id for r in deliveries if not r.cancel.is_set())
                for r in deliveries:
                    if r.job_id in canceled:
                        log.info("stopping canceled job", extra={"job_id": r.job_id})
                        r.cancel.set()
            except RedisError as exc:
                log.warning("cancel check failed", extra={"error": str(exc)})
            now = time.monotonic()
            for r in deliveries:
                if r.taken and now > r.hard_deadline:
                    self._write_off(r)

    def _write_off(self, r: ThreadedDelivery) -> None:
        """A job past its hard deadline: fail it, free its slots, replace its thread."""
        with self._cond:
            if r.abandoned or r.key not in self.running:
                return
            r.abandoned = True
            self._cond.notify_all()
        r.cancel.set()
        self._spawn()
        capacity.release_owner(r.job_id)
        try:
            close_old_connections()
            job = Job.objects.filter(pk=r.job_id, state=JobState.RUNNING, worker=self.worker_name).first()
            if job is not None:
                waited = time.monotonic() - r.started
                job.mark_failed(
                    f"timed out after {job.timeout_s}s: the backend call did not return "
                    f"({waited:.0f}s); the call was abandoned and its slot freed"
                )
            log.warning("job written off past its deadline", extra={"job_id": r.job_id})
        except Exception:
            log.exception("could not fail the job past its deadline", extra={"job_id": r.job_id})
