"""One writer thread per worker process: the job threads' database writes, many per transaction.

Why: with ``MAX_CONCURRENCY`` job threads each committing its own claim and outcome, the
writes queue on the database's write lock (SQLite's busy handler sleeps between tries, up to
tens of milliseconds; PostgreSQL pays a WAL flush per commit), and that wait, not the work,
held each slot. One thread writing whatever is waiting as one transaction (a group commit)
takes the lock once per batch and commits once, and the status mirror writes that follow go
out in one Redis pipeline.

Each write runs in its own savepoint, so one that raises fails alone: its caller gets the
exception, the others commit. A caller blocks until its write is committed, so code that calls
``run(job.mark_failed, ...)`` keeps the meaning of calling it directly (the status mirror, which
may lag a moment anyway, is written just after the callers are released).

``run_batched(fn, item)`` is for writes that have a set form (``Job.mark_succeeded_many``): the
items of one batch go to one ``fn(items)`` call, a couple of statements for all of them; if that
raises, each item is retried alone so that only the bad one fails.

``run_batched(fn, item, then=callback)`` does not wait: the caller goes on (a job thread takes its
next job) and ``callback(value)`` runs in the writer once the write is committed.
What is still waiting when the process is killed is lost, as an uncommitted transaction would be:
the job stays ``running`` on a dead worker and crash recovery runs it again. A deferred write the
database refused for want of a connection (a restart, a failover, a lock timeout) is tried again
every ``RETRY_PAUSE_S`` for as long as the writer runs: nobody else would finish its job while this
worker is alive, so giving up would leave the job ``running`` for good. ``retrying`` counts those
writes (the worker's status shows it); when the worker stops, what is still unwritten is recovered
as a lost job. At most ``MAX_DEFERRED`` writes wait at all; past that, callers wait for theirs
(back-pressure), and no new job is claimed while the database is away anyway.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import InterfaceError, OperationalError, close_old_connections, connection, transaction

from jobs import status_mirror

log = logging.getLogger(__name__)
T = TypeVar("T")

# Writes in one transaction at most: a bound on how long the write lock is held.
MAX_BATCH = 64
# Deferred writes (``then=``) waiting at most; past this, callers wait for theirs.
MAX_DEFERRED = 256
# How often the writer checks its database connection (age, health), and after any failed batch.
CHECK_EVERY_S = 30.0
# A deferred write that failed for want of the database is tried again this often, while the writer
# runs; a write still waiting is logged as an error every RETRY_LOG_EVERY tries.
RETRY_PAUSE_S = 1.0
RETRY_LOG_EVERY = 60
# What a database that is away (a restart, a failover, a lock timeout) raises; other errors are the write's own.
DATABASE_AWAY = (OperationalError, InterfaceError)


def log_database_wait(tries: int, what: str, **extra: Any) -> None:
    """A write waiting for the database: a warning at the first refusal, an error every ``RETRY_LOG_EVERY``."""
    if tries == 1:
        log.warning("database write failed; trying again until the database answers", extra={"write": what, **extra})
    elif tries % RETRY_LOG_EVERY == 0:
        log.error("database write still waiting for the database", extra={"write": what, "try": tries, **extra})


def until_database_answers(fn: Callable[[], T], *, what: str, give_up: Callable[[], bool], **extra: Any) -> T:
    """``fn()``, tried again every ``RETRY_PAUSE_S`` while the database is away: nobody else would
    write what a live worker holds, and giving up would leave its jobs ``running`` for good. Once
    ``give_up()`` says so (a stop's grace is over) the refusal is raised: recovery re-runs the jobs."""
    tries = 0
    while True:
        try:
            return fn()
        except DATABASE_AWAY as exc:
            tries += 1
            if give_up():
                raise
            log_database_wait(tries, what, error=repr(exc), pause_s=RETRY_PAUSE_S, **extra)
            close_old_connections()
            time.sleep(RETRY_PAUSE_S)


class _Write:
    __slots__ = ("fn", "args", "kwargs", "batched", "then", "deferred", "tries", "done", "value", "error")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        batched: bool = False,
        then: Callable[[Any], None] | None = None,
    ) -> None:
        self.fn, self.args, self.kwargs, self.batched, self.then = fn, args, kwargs, batched, then
        self.deferred = False  # the caller did not wait
        self.tries = 1
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    """A writer thread; ``run(fn, ...)`` from any thread returns what ``fn`` returned, once committed."""

    def __init__(self, name: str = "group-commit") -> None:
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stopped = False
        self._deferred = 0  # deferred writes not yet done
        self.retrying = 0  # deferred writes waiting for the database (changed by the writer thread only)
        self._one_writer = connection.vendor == "sqlite"
        self._checked_at = 0.0  # when the writer's connection was last checked (close_old_connections)
        self._pause = False  # a deferred write is to be tried again: wait a moment first
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        self.batches = 0
        self.writes = 0

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` in the writer's next transaction and wait; directly once the writer stopped
        (a written-off job thread's late outcome) or when called from the writer itself."""
        return self._submit(_Write(fn, args, kwargs))

    def run_in_own_transaction(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A write that is a batch already (a worker's claim): at once, in the caller's thread and its
        own transaction, where the database takes concurrent writers; queued like ``run`` on SQLite,
        which has one writer at a time (two writers there would sleep on each other's lock)."""
        if self._one_writer:
            return self.run(fn, *args, **kwargs)
        with status_mirror.batched(), transaction.atomic():
            return fn(*args, **kwargs)

    def run_batched(
        self, fn: Callable[[list[Any]], list[T]], item: Any, *, then: Callable[[T], None] | None = None
    ) -> T | None:
        """``fn([item, ...])[i]``: ``item`` joins the other items for ``fn`` waiting in the batch.

        With ``then``, returns None at once and calls ``then(value)`` from the writer after commit.
        """
        return self._submit(_Write(fn, (item,), {}, batched=True, then=then))

    def _submit(self, write: _Write) -> Any:
        with self._lock:
            queued = not self._stopped and threading.current_thread() is not self._thread
            deferred = queued and write.then is not None and self._deferred < MAX_DEFERRED
            if deferred:
                self._deferred += 1
                write.deferred = True
            if queued:
                self._queue.put(write)
        if not queued:
            value = write.fn([*write.args])[0] if write.batched else write.fn(*write.args, **write.kwargs)
            if write.then is not None:
                write.then(value)
            return None if write.then is not None else value
        if deferred:
            return None
        write.done.wait()
        if write.error is not None:
            raise write.error
        return None if write.then is not None else write.value

    def stop(self, timeout: float = 5.0) -> None:
        """Commit what is waiting, then end the thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._queue.put(None)
        self._thread.join(timeout)

    def _serve(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < MAX_BATCH:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                try:
                    self._commit(batch)
                except Exception:  # a bug in our handling must not stop the writer (callers would hang)
                    log.exception("group commit crashed", extra={"writes": len(batch)})
                    for write in batch:
                        write.error = write.error or RuntimeError("group commit crashed")
                        write.done.set()
                if stop:
                    return
                if self._pause:
                    self._pause = False
                    time.sleep(RETRY_PAUSE_S)
        finally:
            self._drop_leftovers()
            connection.close()

    def _drop_leftovers(self) -> None:
        """At exit: writes queued after the stop (retries) are not committed; say so."""
        left = 0
        while True:
            try:
                write = self._queue.get_nowait()
            except queue.Empty:
                break
            if write is not None:
                left += 1
                if write.tries > 1:
                    self.retrying -= 1
                write.error = write.error or RuntimeError("writer stopped")
                write.done.set()
        if left:
            log.error("writes not committed at exit; their jobs are recovered as lost", extra={"writes": left})

    def _commit(self, batch: list[_Write]) -> None:
        self.batches += 1
        self.writes += len(batch)
        groups: dict[Callable[..., Any], list[_Write]] = {}
        for write in batch:
            if write.batched:
                groups.setdefault(write.fn, []).append(write)
        if time.monotonic() - self._checked_at > CHECK_EVERY_S:
            # Not per batch: on PostgreSQL each check costs a round trip (the health check's query).
            close_old_connections()
            self._checked_at = time.monotonic()
        try:
            with status_mirror.batched():  # the batch's mirror writes leave in one pipeline, at the end
                try:
                    with transaction.atomic():
                        for write in batch:
                            if not write.batched:
                                self._apply(write.fn, [write], many=False)
                        for fn, writes in groups.items():
                            if not self._apply(fn, writes, many=True) and len(writes) > 1:
                                for write in writes:  # find the bad one: each alone
                                    self._apply(fn, [write], many=True)
                except Exception as exc:  # the commit itself failed: none of the batch is written
                    log.exception("group commit failed", extra={"writes": len(batch)})
                    self._checked_at = 0.0  # a broken connection is replaced before the next batch
                    for write in batch:
                        if write.error is None:
                            write.error = exc
                finally:
                    for write in batch:  # committed: the callers go on while the mirror is written
                        write.done.set()
        finally:
            self._after(batch)

    def _after(self, batch: list[_Write]) -> None:
        """The callbacks of the batch's deferred writes (and of waited ones that had one)."""
        for write in batch:
            if write.then is None:
                continue
            if write.deferred and self._retry(write):
                continue
            if write.deferred:
                with self._lock:
                    self._deferred -= 1
                if write.tries > 1:
                    self.retrying -= 1
            if write.error is not None:
                log.error(
                    "deferred write failed",
                    extra={"write": getattr(write.fn, "__qualname__", repr(write.fn)), "error": repr(write.error)},
                )
                continue
            try:
                write.then(write.value)
            except Exception:
                log.exception("after-write callback failed")

    def _retry(self, write: _Write) -> bool:
        """Queue a deferred write again when the database refused it for want of a connection."""
        if not isinstance(write.error, DATABASE_AWAY):
            return False
        if write.tries == 1:
            self.retrying += 1
        log_database_wait(
            write.tries, "deferred", error=repr(write.error), waiting=self.retrying, pause_s=RETRY_PAUSE_S
        )
        write.tries += 1
        write.error = write.value = None
        write.done.clear()
        self._pause = True
        self._checked_at = 0.0  # a broken connection is replaced before the next try
        self._queue.put(write)
        return True

    @staticmethod
    def _apply(fn: Callable[..., Any], writes: list[_Write], *, many: bool) -> bool:
        """One savepoint: ``fn`` for ``writes`` (all of them in one call when ``many``); False if it raised."""
        try:
            with transaction.atomic():
                values = fn([w.args[0] for w in writes]) if many else [fn(*writes[0].args, **writes[0].kwargs)]
        except Exception as exc:
            for write in writes:
                write.error = exc
            return False
        for write, value in zip(writes, values, strict=True):
            write.value, write.error = value, None
        return True
