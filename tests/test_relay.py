"""The relay's follower (``jobs.relay``) on a real Redis: cancels always land, wake-ups arrive."""

from __future__ import annotations

import asyncio
import random

from django.conf import settings
from redis import asyncio as aioredis

from jobs import deltas
from jobs.relay import Notifier, _cancellable


def test_a_cancel_always_stops_a_loop_of_redis_reads():
    """redis-py loses some cancels mid-command (#2028); the relay's reads re-raise them."""

    async def run() -> int:
        client = aioredis.from_url(settings.REDIS_URL)
        stuck = 0
        for _ in range(200):

            async def reads() -> None:
                while True:
                    await _cancellable(client.xread({"llmo-test-none": "0-0"}))
                    await _cancellable(client.get("llmo-test-none"))

            task = asyncio.ensure_future(reads())
            await asyncio.sleep(random.random() * 0.004)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=1)
            stuck += not done
        await client.aclose()
        return stuck

    assert asyncio.run(run()) == 0


def test_events_come_as_published_then_done_with_the_status(transactional_db):
    from tests.factories import make_job

    job = make_job(state="running", stream=True)

    async def run() -> list:
        notifier = Notifier(settings.REDIS_URL)
        got = []

        async def follow() -> None:
            async for _, event in notifier.events(str(job.pk)):
                got.append(event)

        task = asyncio.ensure_future(follow())
        await asyncio.sleep(0.3)  # subscribed and idle: only a wake-up brings the next event quickly
        await asyncio.to_thread(deltas.publish, job.pk, [{"type": "delta", "content": "hi"}])
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.02)
        assert got == [{"type": "delta", "content": "hi"}]  # well before the 2 s periodic look
        await asyncio.to_thread(_finish, job)
        await asyncio.wait_for(task, 5)
        return got

    got = asyncio.run(run())
    assert got[-1]["type"] == "done" and got[-1]["status"]["state"] == "succeeded"
    assert got[-1]["status"]["output"] == "hi"


def _finish(job) -> None:
    job.transition("succeeded", output="hi", finish_reason="stop")


def test_a_new_follower_is_subscribed_without_waiting_out_the_readers_read(transactional_db):
    """The reader blocks in a read while it follows other jobs; a new job's follower must not wait for it."""
    from tests.factories import make_job

    busy, new = make_job(state="running", stream=True), make_job(state="running", stream=True)

    async def run() -> float:
        notifier = Notifier(settings.REDIS_URL)
        notifier.READ_S = 30.0  # longer than the test: only a nudge ends a read early

        async def follow(job, got: list) -> None:
            async for _, event in notifier.events(str(job.pk)):
                got.append(event)

        other: list = []
        first = asyncio.ensure_future(follow(busy, other))
        await asyncio.sleep(0.3)  # the reader now sits in a read for busy's channel
        got: list = []
        second = asyncio.ensure_future(follow(new, got))
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        await asyncio.to_thread(deltas.publish, new.pk, [{"type": "delta", "content": "hi"}])
        while not got and asyncio.get_running_loop().time() - started < 5:
            await asyncio.sleep(0.01)
        took = asyncio.get_running_loop().time() - started
        for task in (first, second):
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        return took

    assert asyncio.run(run()) < 1.0  # not the 2 s periodic look
