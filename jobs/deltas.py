"""A job's output as it is produced: one capped, expiring Redis Stream per job.

The worker running a job writes; the web tier reads and relays (SSE). Each entry holds one event,
JSON in its one field ``e``; its entry id (``<ms>-<seq>``) is what SSE sends as ``id:`` and a
client returns as ``Last-Event-ID``: :func:`read` takes it as ``after_id`` and answers the entries
after it. Events, in order:

- ``{"type": "delta", "content": "..."}`` and/or ``"tool_calls": [...]`` in OpenAI's chunk shape
  (``{"index", "id", "type", "function": {"name", "arguments"}}``: the first delta of a call carries
  its id, type and name, later ones argument fragments to append). Consecutive deltas may arrive
  merged (text concatenated, a call's argument fragments joined): the concatenation is the same.
- ``{"type": "reset", "attempt": n}``: attempt ``n`` starts over after earlier output (a retry, a
  fallback to another backend, a job run again after its worker was lost or an operator's retry).
  Everything before it in the stream is void and was deleted from it, so a reader starting now
  sees the reset first; a reader that already relayed earlier deltas must decide (an OpenAI relay
  cannot take chunks back: it should end that response with an error rather than mix two answers).
- ``{"type": "end", "state", "finish_reason", "usage": {"prompt_tokens", "completion_tokens"},
  "error"}``: the job reached ``state`` (succeeded, failed, canceled) and its outcome is committed;
  nothing follows. The result (output, ``tool_calls``) is the job's row / status document.

The ``end`` comes from the worker that ran the job. Jobs that end without one (expired or canceled
while queued, failed by the watchdog because the call never returned, a worker killed outright)
have no end event: a reader whose blocking read comes back empty should look at the job's state
(the status mirror) and stop when it is final. Streams are capped (``STREAM_MAX_EVENTS``, approximate:
the oldest entries go) and expire ``STREAM_TTL_S`` after their last write.

Writing is buffered (:class:`JobStream`): one thread per process flushes every job's pending events
in one pipeline, the first delta of a job at once (time to first token), later ones at most every
``STREAM_FLUSH_MS`` or when ``STREAM_FLUSH_EVENTS`` wait. Publishing never fails a job: a Redis error
loses those events with a warning (the database still has the outcome).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from django.conf import settings
from redis import Redis
from redis.exceptions import RedisError

from jobs.status_mirror import notify_channel
from orchestrator_site.redis import key, redis_client

log = logging.getLogger(__name__)

FIELD = "e"
Event = dict[str, Any]


def stream_key(job_id: object) -> str:
    return key("deltas", job_id)


def end_event(state: str, finish_reason: str = "", usage: dict[str, Any] | None = None, error: str = "") -> Event:
    """The terminal event (see the module docstring)."""
    return {
        "type": "end",
        "state": state,
        "finish_reason": finish_reason or None,
        "usage": usage or {"prompt_tokens": None, "completion_tokens": None},
        "error": error or None,
    }


# --- reading (the web tier) -------------------------------------------------------------------------
def read(
    job_id: object,
    after_id: str = "0-0",
    *,
    block_ms: int | None = None,
    count: int | None = None,
    client: Redis | None = None,
) -> list[tuple[str, Event]]:
    """The events after ``after_id`` ("0-0": from the start), oldest first, as ``(entry id, event)``.

    With ``block_ms``, waits up to that long for the first one (0 would wait for ever: don't). An
    unknown or expired stream reads as empty.
    """
    reply = (client or redis_client()).xread({stream_key(job_id): after_id}, count=count, block=block_ms)
    return decode(reply)


async def aread(
    client: Any, job_id: object, after_id: str = "0-0", *, block_ms: int | None = None, count: int | None = None
) -> list[tuple[str, Event]]:
    """:func:`read` with a ``redis.asyncio`` client (an ASGI relay's: no thread held while it waits)."""
    reply = await client.xread({stream_key(job_id): after_id}, count=count, block=block_ms)
    return decode(reply)


def follow(
    job_id: object,
    after_id: str = "0-0",
    *,
    block_ms: int = 5000,
    on_idle: Callable[[], bool] | None = None,
    client: Redis | None = None,
) -> Iterator[tuple[str, Event]]:
    """Every event from ``after_id`` on, as they come, through the ``end`` event (included).

    When a blocking read comes back empty, ``on_idle()`` decides whether to go on (e.g. False once
    the job's state is final: see the module docstring for jobs without an end event); without it,
    the iterator waits for ever.
    """
    while True:
        events = read(job_id, after_id, block_ms=block_ms, client=client)
        if not events and on_idle is not None and not on_idle():
            return
        for event_id, event in events:
            after_id = event_id
            yield event_id, event
            if event.get("type") == "end":
                return


def decode(reply: Any) -> list[tuple[str, Event]]:
    """An ``XREAD`` (or ``XRANGE``) reply, from a sync or asyncio client, bytes or str, as events."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3 clients answer XREAD with a map
        entries = [e for value in reply.values() for e in (value[0] if value and isinstance(value[0], list) else value)]
    elif isinstance(reply[0], list | tuple) and len(reply[0]) == 2 and isinstance(reply[0][1], list):
        entries = [e for _name, items in reply for e in items]  # XREAD: [(stream, [(id, fields)...])]
    else:
        entries = list(reply)  # XRANGE: [(id, fields)...]
    out: list[tuple[str, Event]] = []
    for entry_id, fields in entries:
        raw = fields.get(FIELD.encode()) if FIELD.encode() in fields else fields.get(FIELD)
        if raw is None:
            continue
        out.append((_text(entry_id), json.loads(raw)))
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- writing (the worker) ---------------------------------------------------------------------------
def publish(job_id: object, events: Iterable[Event], *, fresh: bool = False, client: Redis | None = None) -> list[str]:
    """Append ``events`` now, in one round trip; returns their entry ids. ``fresh`` deletes what was there.

    Workers go through :class:`JobStream` (buffered); this is the unbuffered write it ends in.
    """
    pipe = (client or redis_client()).pipeline(transaction=False)
    n = _queue_writes(pipe, stream_key(job_id), list(events), fresh, str(job_id))
    replies = pipe.execute()
    first = 1 if fresh else 0
    return [_text(r) for r in replies[first : first + n]]


def _queue_writes(pipe: Any, name: str, events: list[Event], fresh: bool, job_id: str) -> int:
    """The events' XADDs, then a wake-up for the job's followers (``jobs.relay``)."""
    if fresh:
        pipe.delete(name)
    cap = settings.STREAM_MAX_EVENTS
    for event in events:
        payload = json.dumps(_ready(event), separators=(",", ":"), ensure_ascii=False)
        pipe.xadd(name, {FIELD: payload}, maxlen=cap, approximate=True)
    if events:
        pipe.expire(name, settings.STREAM_TTL_S)
    if events or fresh:
        pipe.publish(notify_channel(job_id), b"d")
    return len(events)


class JobStream:
    """One job run's writer: the adapter's delta sink, reset between attempts, the end event.

    ``attempt`` is the job's attempt number when the run starts: above 1, earlier output may be in
    the stream (the job ran before), so the run's first write resets it.
    """

    def __init__(self, job_id: object, attempt: int = 1) -> None:
        self.key = stream_key(job_id)
        self.job_id = str(job_id)
        self.attempt = attempt
        self.stale = attempt > 1  # the stream may hold an earlier delivery's output
        self.sent = False  # this run wrote deltas (a later attempt must reset)
        self.closed = False
        # Guarded by the flusher's lock:
        self.pending: list[Event] = []
        self.fresh = False  # delete the stream before writing pending (a reset)
        self.waiting = 0  # deltas since the last flush
        self.due_at: float | None = None
        self.last_flush = -math.inf
        self.flushes = 0
        self.batch = 0  # the flusher's batch that took this stream's events last

    def begin_attempt(self, attempt: int) -> None:
        """A call for attempt ``attempt`` starts: if output went out before it, a ``reset`` goes first."""
        self.attempt = attempt
        if self.sent or self.stale:
            self.sent = self.stale = False
            _flusher().add(self, {"type": "reset", "attempt": attempt}, reset=True)

    def __call__(self, delta: dict[str, Any]) -> None:
        """The adapter's delta sink."""
        if self.closed or not delta:
            return
        self.sent = True
        _flusher().add(self, {"type": "delta", **delta})

    def flush(self, timeout_s: float = 2.0) -> bool:
        """Write what is pending now and wait until it is in Redis; True when done within ``timeout_s``.

        Before a success is committed: readers end when the status turns terminal, so the last deltas
        must be in the stream by then, not a flush interval later.
        """
        return _flusher().flush(self, timeout_s)

    def end(self, state: str, finish_reason: str = "", usage: dict[str, Any] | None = None, error: str = "") -> None:
        """The terminal event; the stream takes nothing more from this run."""
        if self.closed:
            return
        self.closed = True
        _flusher().add(self, end_event(state, finish_reason, usage, error), urgent=True)


def _merge(last: Event | None, event: Event) -> bool:
    """Fold delta ``event`` into ``last`` (the pending one before it) when the result reads the same.

    Pending text is kept as a list of pieces (joined when written): a long answer is not copied per token.
    """
    if last is None or last.get("type") != "delta" or event.get("type") != "delta":
        return False
    if len(event) == 2 and "content" in event:
        if len(last) == 2 and isinstance(last.get("content"), list):
            last["content"].append(event["content"])
            return True
        return False
    if len(event) == 2 and len(last) == 2 and "tool_calls" in event and "tool_calls" in last:
        new = event["tool_calls"]
        if (
            len(new) == 1
            and set(new[0]) <= {"index", "function"}
            and set(new[0].get("function") or {}) == {"arguments"}
        ):
            prev = last["tool_calls"][-1]
            if prev.get("index") == new[0].get("index"):
                fn = prev.setdefault("function", {})
                fn["arguments"] = (fn.get("arguments") or "") + new[0]["function"]["arguments"]
                return True
    return False


def _copy(event: Event) -> Event:
    if "tool_calls" in event:  # nested: merging must not change what the adapter holds
        return json.loads(json.dumps(event))
    if len(event) == 2 and event.get("type") == "delta" and "content" in event:
        return {"type": "delta", "content": [event["content"]]}
    return dict(event)


def _ready(event: Event) -> Event:
    """A pending event as written: text pieces joined."""
    if isinstance(event.get("content"), list):
        return {**event, "content": "".join(event["content"])}
    return event


class _Flusher:
    """The process's one writer thread: every job's pending events, one pipeline per pass."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.dirty: dict[JobStream, None] = {}  # an ordered set
        self.writing = 0
        self.batches = 0  # batches taken
        self.written = 0  # batches written (or given up on), in order: one thread writes them
        self.thread: threading.Thread | None = None

    def add(self, stream: JobStream, event: Event, *, urgent: bool = False, reset: bool = False) -> None:
        now = time.monotonic()
        with self.cond:
            if reset:
                stream.pending, stream.fresh = [], True  # what was not written yet is void too
            if not _merge(stream.pending[-1] if stream.pending else None, event):
                stream.pending.append(_copy(event))
            stream.waiting += 1
            first = stream.flushes == 0
            if urgent or reset or first or stream.waiting >= settings.STREAM_FLUSH_EVENTS:
                due = now
            else:
                due = max(now, stream.last_flush + settings.STREAM_FLUSH_S)
            if stream.due_at is None or due < stream.due_at:
                stream.due_at = due
                self.dirty[stream] = None
                self.cond.notify()
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="delta-flusher", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while True:
            with self.cond:
                while True:
                    now = time.monotonic()
                    due = [s for s in self.dirty if s.due_at is not None and s.due_at <= now]
                    if due:
                        break
                    waits = [s.due_at - now for s in self.dirty if s.due_at is not None]
                    self.cond.wait(min(waits) if waits else None)
                batch = []
                self.batches += 1
                number = self.batches
                for s in due:
                    del self.dirty[s]
                    batch.append((s, s.pending, s.fresh))
                    s.pending, s.fresh, s.waiting, s.due_at = [], False, 0, None
                    s.last_flush, s.flushes, s.batch = now, s.flushes + 1, number
                self.writing += 1
            try:
                self._write(batch)
            finally:
                with self.cond:
                    self.writing -= 1
                    self.written = number
                    self.cond.notify_all()

    @staticmethod
    def _write(batch: list[tuple[JobStream, list[Event], bool]]) -> None:
        try:
            pipe = redis_client().pipeline(transaction=False)
            for stream, events, fresh in batch:
                _queue_writes(pipe, stream.key, events, fresh, stream.job_id)
            pipe.execute()
        except RedisError as exc:
            log.warning("deltas not published", extra={"jobs": [s.job_id for s, _, _ in batch], "error": str(exc)})
        except Exception:  # the thread must survive anything: it serves every job of the process
            log.exception("deltas not published")

    def flush(self, stream: JobStream, timeout_s: float) -> bool:
        """Make ``stream``'s pending events due now and wait until they are written."""
        with self.cond:
            if stream in self.dirty:
                stream.due_at = time.monotonic()
                self.cond.notify_all()
            return self.cond.wait_for(lambda: stream not in self.dirty and self.written >= stream.batch, timeout_s)

    def drain(self, timeout_s: float) -> bool:
        """Write everything pending now; True when it was written (or given up on) within ``timeout_s``."""
        with self.cond:
            now = time.monotonic()
            for s in self.dirty:
                s.due_at = now
            self.cond.notify_all()
            return self.cond.wait_for(lambda: not self.dirty and not self.writing, timeout_s)


_instance: _Flusher | None = None
_instance_lock = threading.Lock()


def _flusher() -> _Flusher:
    global _instance
    if _instance is None:
        with _instance_lock:
            if _instance is None:
                _instance = _Flusher()
    return _instance


def _forget_after_fork() -> None:
    # A forked child (RQ's work horse) has no flusher thread: it starts its own on first use.
    global _instance, _instance_lock
    _instance, _instance_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def drain(timeout_s: float = 5.0) -> bool:
    """Write every buffered event of this process now (before it exits: RQ's work horse ends with
    ``os._exit``, which runs no exit handler); True when done within ``timeout_s``."""
    instance = _instance
    return True if instance is None else instance.drain(timeout_s)


atexit.register(drain, 2.0)
