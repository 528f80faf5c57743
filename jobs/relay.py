"""Following a job from the event loop: its deltas as they come, and its end, without a thread each.

A web process holds one Redis pub/sub connection (:class:`Notifier`). Whoever changes what a
follower is waiting for publishes a wake-up on the job's channel (``notify_channel``): the worker
after it appends deltas (``jobs.deltas``), the status mirror when it writes a new state. A woken
follower then reads what is new with one ``XRANGE``: the stream is the record, the channel only says
"look". A follower also looks every ``POLL_S`` seconds, so a lost wake-up (a Redis restart drops the
connection) costs at most that delay, never a hang.

The end of a job is its status document turning terminal (the mirror, else the database): that
covers jobs no worker ever ran (expired, or canceled while queued) as well as those that ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from redis.exceptions import RedisError

from jobs import deltas
from jobs.models import TERMINAL_STATES, Job
from jobs.status_mirror import cache_key, notify_channel
from orchestrator_site.redis import async_client

log = logging.getLogger(__name__)

POLL_S = 2.0
T = TypeVar("T")


class Notifier:
    """One pub/sub connection per process; any number of jobs followed at once.

    Only the reader task touches the pub/sub connection (redis-py's is not safe for a command and a
    read at once): followers say which channels they want, the reader subscribes and unsubscribes
    between reads, then wakes the new channels' followers so that nothing published before the
    subscription took effect is missed. A follower of a new channel cuts the reader's read short with
    a message on the notifier's own channel (``_nudge``); else it would wait out ``READ_S``, most of
    a short job's time.
    """

    READ_S = 0.1  # the reader's longest read: how soon a new subscription takes effect if a nudge is lost

    def __init__(self, url: str) -> None:
        self.redis = async_client(url)
        self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._subscribed: set[str] = set()
        self._reader: asyncio.Task | None = None
        self._control = notify_channel(f"relay-{uuid.uuid4().hex}")  # this notifier's own: wakes its reader
        self._control_subscribed = False
        self._nudged = False

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the job's channel says something changed (and once subscribed)."""
        channel = notify_channel(job_id)
        wake = asyncio.Event()
        self._waiters.setdefault(channel, set()).add(wake)
        fresh = self._reader is None or self._reader.done()
        if fresh:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            if not fresh and channel not in self._subscribed:
                await self._nudge()
            yield wake
        finally:
            waiters = self._waiters.get(channel)
            if waiters is not None:
                waiters.discard(wake)
                if not waiters:
                    del self._waiters[channel]

    async def _nudge(self) -> None:
        """Wake the reader from its read so that it subscribes now (once per pending change)."""
        if self._nudged or not self._control_subscribed:
            return
        self._nudged = True
        try:
            await _cancellable(self.redis.publish(self._control, b""))
        except (RedisError, OSError):  # the reader's read ends within READ_S anyway
            self._nudged = False

    async def _sync_subscriptions(self) -> None:
        self._nudged = False  # changes from now on need a new nudge
        if not self._control_subscribed:
            await self._pubsub.subscribe(self._control)
            self._control_subscribed = True
        wanted = set(self._waiters)
        stale, new = self._subscribed - wanted, wanted - self._subscribed
        if stale:
            await self._pubsub.unsubscribe(*stale)
            self._subscribed -= stale
        if new:
            await self._pubsub.subscribe(*new)
            self._subscribed |= new
            for channel in new:  # published before the subscription: look once more
                for wake in self._waiters.get(channel, ()):
                    wake.set()

    async def _read(self) -> None:
        while self._waiters or self._subscribed:
            try:
                await self._sync_subscriptions()
                if not self._subscribed:
                    continue
                message = await self._pubsub.get_message(timeout=self.READ_S)
            except (RedisError, OSError) as exc:  # the followers' periodic look still finds the end
                log.warning("relay pub/sub failed; reconnecting", extra={"error": str(exc)})
                self._subscribed.clear()
                self._control_subscribed = False
                with contextlib.suppress(RedisError, OSError):
                    await self._pubsub.reset()
                await asyncio.sleep(0.5)
                continue
            if message and message.get("type") == "message":
                channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
                for wake in self._waiters.get(channel, ()):
                    wake.set()

    async def status(self, job_id: str) -> dict[str, Any] | None:
        """The job's status document: the mirror's, else the database's (None: no such job)."""
        try:
            raw = await _cancellable(self.redis.get(cache_key(job_id)))
        except RedisError:
            raw = None
        if raw is not None:
            return json.loads(raw.partition(b"|")[2])
        return await _status_from_db(job_id)

    async def events(
        self, job_id: str, after: str = "0-0", *, idle_s: float | None = None
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The job's delta events after ``after``, then one ``("", {"type": "done", "status": doc})``.

        ``done`` comes when the status document is terminal and every event written before it was
        yielded, so a relay can build the final answer from the document. With ``idle_s``, a quiet
        spell that long yields ``("", {"type": "idle"})`` (a relay's cue for a keep-alive).
        """
        loop = asyncio.get_running_loop()
        last = loop.time()
        async with self.watch(job_id) as wake:
            while True:
                if idle_s is not None and loop.time() - last >= idle_s:
                    last = loop.time()
                    yield "", {"type": "idle"}
                wake.clear()
                batch = await self._read_stream(job_id, after)
                for event_id, event in batch:
                    after = event_id
                    yield event_id, event
                if batch:
                    last = loop.time()
                    continue
                doc = await self.status(job_id)
                if doc is None or doc.get("state") in TERMINAL_STATES:
                    tail = await self._read_stream(job_id, after)  # written just before the end
                    for event_id, event in tail:
                        yield event_id, event
                    yield "", {"type": "done", "status": doc}
                    return
                wait_s = POLL_S if idle_s is None else max(0.0, min(POLL_S, idle_s - (loop.time() - last)))
                # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancel that lands as the
                # wait ends, and the relay would then outlive its client.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await wake.wait()

    async def _read_stream(self, job_id: str, after: str) -> list[tuple[str, dict[str, Any]]]:
        try:
            return await _cancellable(deltas.aread(self.redis, job_id, after))
        except RedisError as exc:
            log.warning("relay stream read failed", extra={"job_id": job_id, "error": str(exc)})
            return []


async def _cancellable(call: Awaitable[T]) -> T:
    """Await a redis-py call, re-raising a cancel it swallowed.

    redis-py's asyncio client loses a ``cancel()`` that lands at the wrong moment of a command
    (redis/redis-py#2028; measured here: 60 of 300 cancels of a loop of reads). A relay that missed
    its client's disconnect would follow the job to its end and never cancel it.
    """
    try:
        return await call
    finally:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError


@sync_to_async(thread_sensitive=False)
def _status_from_db(job_id: str) -> dict[str, Any] | None:
    job = Job.objects.filter(pk=job_id).first()
    return job.status_document() if job is not None else None


@sync_to_async(thread_sensitive=False)
def cancel(job_id: str) -> bool:
    """Cancel a job whose follower went away (a queued job leaves its queue; a running one stops)."""
    from django.db import transaction

    job = Job.objects.filter(pk=job_id).first()
    if job is None:
        return False
    with transaction.atomic():
        return job.cancel()


_notifiers: dict[int, Notifier] = {}


def notifier() -> Notifier:
    """This event loop's notifier (one per process in practice: one loop per uvicorn worker)."""
    loop = asyncio.get_running_loop()
    found = _notifiers.get(id(loop))
    if found is None:
        found = _notifiers[id(loop)] = Notifier(settings.REDIS_URL)
    return found
