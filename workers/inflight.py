"""Many jobs in flight in one worker process: a fixed pool of job threads, and a watcher.

Why threads: the API backends (Ollama, OpenAI-compatible, dev) spend a job waiting on a socket,
so one process can keep ``MAX_CONCURRENCY`` calls going; the GIL is released while they wait.
A fixed pool (not a thread per job) keeps each thread's database connection open across jobs.

The worker's main thread stays RQ's loop: it dequeues (``high`` before ``normal`` before ``low``),
claims what it popped in one transaction, and hands the jobs over until ``size`` are running and
a few more wait here. A thread that finishes takes the highest-priority waiting job at once,
instead of idling through the main thread's next round of Redis and database calls (at 300 jobs/s
that round cost a fifth of the slots). How many may wait adapts to how long jobs run: no more
than ``size`` threads finish in ``PREFETCH_WAIT_S`` on average (and at most ``prefetch``), so a
waiting job starts within about that long of its claim, and with long jobs nothing waits at all
(a job must not sit behind a long one here while another worker is idle). On shutdown the
waiting jobs are handed back (re-queued) at once; if the process dies they are recovered like
the running ones.

The watcher thread (every ``WORKER_WATCH_S``) looks after the running jobs:

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
from datetime import datetime
from typing import Any, TypeVar

from django.conf import settings
from django.db import close_old_connections, connection
from redis.exceptions import RedisError
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.queue import Queue

from jobs import cancellation
from jobs.models import Job, JobState
from routing import capacity
from workers.group_commit import GroupCommit
from workers.write_behind import WriteBehind

log = logging.getLogger(__name__)
_local = threading.local()
T = TypeVar("T")


def worker_name() -> str | None:
    """The name of the worker whose job thread this is (None outside one)."""
    return getattr(_local, "worker", None)


def note_job(job: Job) -> None:
    """The task tells its thread's entry which row it runs (no-op outside a job thread)."""
    running = getattr(_local, "running", None)
    if running is not None:
        running.job = job


def write(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``: through this process's group commit in a job thread, directly elsewhere."""
    commits = getattr(_local, "commits", None)
    return commits.run(fn, *args, **kwargs) if commits is not None else fn(*args, **kwargs)


def write_batched(
    fn: Callable[[list[Any]], list[T]], item: Any, *, then: Callable[[T], None] | None = None
) -> T | None:
    """``fn([item])[0]``, with ``item`` joining the others for ``fn`` in this process's next group commit.

    ``then(value)`` follows the write. In a job thread whose entry takes its outcome late
    (``Running.after_outcome``) a write with ``then`` does not wait: it returns None, the thread is
    free for its next job, and ``then`` and the entry's hook run in the writer once the write is
    committed. Otherwise it waits, calls ``then`` itself and returns the value.
    """
    commits: GroupCommit | None = getattr(_local, "commits", None)
    running: Running | None = getattr(_local, "running", None)
    if then is not None and commits is not None and running is not None and running.after_outcome is not None:
        hook = running.after_outcome
        running.outcome_deferred = True

        def done(value: T) -> None:
            then(value)
            hook()

        commits.run_batched(fn, item, then=done)
        return None
    value = commits.run_batched(fn, item) if commits is not None else fn([item])[0]
    if then is not None:
        then(value)
    return value


def cancel_event() -> threading.Event:
    """The cancel event of the job this thread runs (a fresh one outside a job thread)."""
    running = getattr(_local, "running", None)
    return running.cancel if running is not None else threading.Event()


# How long a claimed job may wait here for a thread, on average (bounds the prefetch).
PREFETCH_WAIT_S = 0.05
# Weight of the latest job in the running average of job times.
RUN_TIME_ALPHA = 0.1


@dataclass(eq=False)
class Running:
    """One job handed to this process's threads: waiting for one, then running in it."""

    rq_job: RQJob
    queue: Queue
    job_id: str
    timeout_s: float  # once running: past this, the watcher writes the job off
    rank: int = 0  # its queue's place in the worker's priority order (0 first)
    # None on the lean path (our own task: no RQ execution record); made as the thread starts it.
    execution: Execution | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # one RQ job may be delivered twice
    # The row as the main thread claimed it (lean path), or as the task loaded it; at the end, as the
    # task left it (its figures are read from memory).
    job: Job | None = None
    since: datetime | None = None  # taken before the claim: the attempts this run opened start after it
    # Run by the writer after a deferred outcome write (``write_batched``); None: outcomes are waited for.
    after_outcome: Callable[[], None] | None = None
    outcome_deferred: bool = False  # the outcome was handed to the writer: after_outcome will run
    taken: bool = False  # a thread is running it
    abandoned: bool = False
    started: float = field(default_factory=time.monotonic)  # monotonic; reset when a thread takes it
    hard_deadline: float = math.inf  # monotonic, set when a thread takes it


class JobThreads:
    """``size`` job threads fed by the worker's main thread, up to ``prefetch`` jobs waiting, and a watcher."""

    def __init__(self, size: int, perform: Callable[[Running], None], worker_name: str, prefetch: int = 0) -> None:
        self.size = size
        self.prefetch = prefetch
        self.perform = perform
        self.worker_name = worker_name
        self.running: dict[str, Running] = {}  # entry key -> entry, waiting or running
        self.done = 0
        self._cond = threading.Condition()
        self._waiting: list[tuple[int, int, Running]] = []  # heap: (rank, arrival, entry)
        self._arrival = itertools.count()
        self.run_time_s: float | None = None  # running average of how long a job holds a thread
        self._stop = threading.Event()
        self._threads = 0
        self.commits = GroupCommit(f"{worker_name}-commits")
        self.write_behind = WriteBehind()  # the finished jobs' figures, flushed by the watcher
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

    def submit(self, entry: Running) -> None:
        with self._cond:
            self.running[entry.key] = entry
            heapq.heappush(self._waiting, (entry.rank, next(self._arrival), entry))
            self._cond.notify_all()

    def wait_for_slot(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.room > 0, timeout)

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no job is running or waiting (written-off ones do not count); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.held == 0, timeout)

    def take_back_waiting(self) -> list[Running]:
        """Remove the claimed jobs no thread has started (shutdown), highest priority first."""
        with self._cond:
            entries = [entry for _, _, entry in sorted(self._waiting, key=lambda w: w[:2])]
            self._waiting.clear()
            for entry in entries:
                self.running.pop(entry.key, None)
            self._cond.notify_all()
        return entries

    def snapshot(self) -> list[Running]:
        """The jobs running in a thread now."""
        with self._cond:
            return [r for r in self.running.values() if r.taken]

    def forget(self, entry: Running) -> None:
        """Stop tracking ``entry`` (re-queued at shutdown): its thread's late outcome is fenced off."""
        with self._cond:
            self.running.pop(entry.key, None)
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
        _local.worker = self.worker_name
        _local.commits = self.commits
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._stop.is_set())
                if not self._waiting:
                    break  # stopping
                entry = heapq.heappop(self._waiting)[2]
                entry.taken = True
                entry.started = time.monotonic()
                entry.hard_deadline = entry.started + entry.timeout_s
            _local.running = entry
            try:
                self.perform(entry)
            except Exception:  # perform_job reports job errors itself; this is a bug in our handling
                log.exception("job thread failed", extra={"job_id": entry.job_id})
            finally:
                _local.running = None
                took = time.monotonic() - entry.started
                with self._cond:
                    self.running.pop(entry.key, None)
                    self.done += 1
                    avg = self.run_time_s
                    self.run_time_s = took if avg is None else avg + RUN_TIME_ALPHA * (took - avg)
                    self._cond.notify_all()
            if entry.abandoned:
                break  # a replacement thread took this one's place when it was written off
        connection.close()

    # --- the watcher ------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(float(settings.WORKER_WATCH_S)):
            self.write_behind.flush()
            with self._cond:  # running and waiting (a job canceled while waiting must not start)
                entries = [r for r in self.running.values() if not r.abandoned]
            if not entries:
                continue
            try:
                canceled = cancellation.requested(r.job_id for r in entries if not r.cancel.is_set())
                for r in entries:
                    if r.job_id in canceled:
                        log.info("stopping canceled job", extra={"job_id": r.job_id})
                        r.cancel.set()
            except RedisError as exc:
                log.warning("cancel check failed", extra={"error": str(exc)})
            now = time.monotonic()
            for r in entries:
                if r.taken and now > r.hard_deadline:
                    self._write_off(r)

    def _write_off(self, r: Running) -> None:
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
