"""The worker's batched paths: the set-form claim and success, the group commit, the write-behind
buffer, and the claimed jobs waiting for a thread (prefetch)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from jobs import fair_queue, status_mirror
from jobs.models import AttemptOutcome, Job, JobAttempt, JobState
from orchestrator_site.redis import redis_client
from tests.factories import make_job
from workers.execution.job_run import DirectWriter
from workers.runtime.group_commit import GroupCommit
from workers.runtime.job_threads import DeliveryWriter, JobThreads, ThreadedDelivery
from workers.runtime.write_behind import WriteBehind

pytestmark = pytest.mark.django_db(transaction=True)


def result(**extra) -> dict:
    return {
        "output": "ok",
        "finish_reason": "stop",
        "prompt_tokens": 2,
        "completion_tokens": 1,
        "latency_ms": 7,
        "cost": None,
        **extra,
    }


# --- the set forms of the transitions ------------------------------------------------------------
def test_claim_moves_the_claimable_rows_once_with_exact_versions(dev_backend):
    jobs = [make_job(dev_backend) for _ in range(4)]
    Job.objects.get(pk=jobs[1].pk).cancel()  # canceled after the worker popped it
    ids = [str(j.pk) for j in jobs]

    rows = Job.claim([*ids, ids[0]], "w1")  # ids[0] twice: a duplicate delivery in one batch

    assert sorted(str(r.pk) for r in rows) == sorted([ids[0], ids[2], ids[3]])
    for row in rows:
        fresh = Job.objects.get(pk=row.pk)
        assert (row.state, row.version, row.attempt_count, row.worker) == (
            fresh.state,
            fresh.version,
            fresh.attempt_count,
            fresh.worker,
        )
        assert fresh.state == JobState.RUNNING and fresh.worker == "w1" and row.started_at == fresh.started_at
        assert row.backend == dev_backend and row.prompt == "hello"  # the whole row, with its backend
        assert list(fresh.attempts.values_list("number", "outcome")) == [(1, AttemptOutcome.RUNNING)]
        assert status_mirror.read(row.pk)["state"] == "running"
    assert Job.objects.get(pk=jobs[1].pk).state == JobState.CANCELED
    assert Job.claim(ids, "w2") == []  # a second worker wins nothing
    assert Job.claim([], "w2") == []


def test_mark_succeeded_many_writes_each_result_and_loses_to_a_cancel(dev_backend):
    jobs = [make_job(dev_backend) for _ in range(3)]
    rows = sorted(Job.claim([str(j.pk) for j in jobs], "w1"), key=lambda r: [j.pk for j in jobs].index(r.pk))
    assert len(rows) == 3
    Job.objects.get(pk=rows[1].pk).cancel()  # the operator cancels while the call runs
    done_at = timezone.now() - timedelta(seconds=2)

    won = Job.mark_succeeded_many(
        [(rows[0], result(output="a", finished_at=done_at)), (rows[1], result(output="b")), (rows[2], result())]
    )

    assert won == [True, False, True]
    first = Job.objects.get(pk=rows[0].pk)
    assert (first.state, first.output, first.finished_at, first.version) == ("succeeded", "a", done_at, rows[0].version)
    assert first.attempts.get().outcome == AttemptOutcome.SUCCEEDED and first.attempts.get().latency_ms == 7
    assert first.attempts.get().finished_at == done_at
    loser = Job.objects.get(pk=rows[1].pk)
    assert (loser.state, loser.output) == (JobState.CANCELED, "")
    assert rows[1].state == JobState.CANCELED and rows[1].version == loser.version  # re-read in memory
    assert loser.attempts.get().outcome == AttemptOutcome.CANCELED
    assert status_mirror.read(rows[0].pk)["state"] == "succeeded"
    assert rows[0]._known_attempts[0].outcome == AttemptOutcome.SUCCEEDED  # memory follows the rows


# --- the group commit --------------------------------------------------------------------------------
def _in_threads(n: int, fn) -> list:
    out: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_group_commit_batches_waiting_writes_and_a_bad_one_fails_alone(dev_backend):
    jobs = [make_job(dev_backend) for _ in range(8)]
    rows = Job.claim([str(j.pk) for j in jobs], "w1")
    assert len(rows) == 8
    commits = GroupCommit("test-commits")
    calls: list[int] = []

    def succeed_many(items):
        calls.append(len(items))
        if len(calls) == 1:
            # Hold the writer on its first write until the other seven wait behind it in its queue,
            # so the next commit must take them together, however the threads were scheduled.
            deadline = time.monotonic() + 10
            while commits._queue.qsize() < 7 and time.monotonic() < deadline:
                time.sleep(0.005)
        if any(job is rows[3] for job, _ in items):
            raise ValueError("bad row")
        return Job.mark_succeeded_many(items)

    def write(i: int):
        try:
            return commits.run_batched(succeed_many, (rows[i], result(output=str(i))))
        except ValueError as exc:
            return exc

    try:
        connection.close()  # the writer thread has its own connection; so do these threads
        out = _in_threads(8, write)
    finally:
        commits.stop()
    assert [isinstance(o, ValueError) for o in out] == [i == 3 for i in range(8)]
    assert [o for i, o in enumerate(out) if i != 3] == [True] * 7
    assert max(calls) > 1, "waiting writes were not batched"
    states = dict(Job.objects.values_list("pk", "state"))
    assert [states[r.pk] for r in rows] == ["running" if i == 3 else "succeeded" for i in range(8)]
    assert commits.batches < commits.writes


def test_a_deferred_write_returns_at_once_and_calls_back_after_commit(dev_backend):
    row = Job.claim([str(make_job(dev_backend).pk)], "w1")
    assert len(row) == 1
    commits = GroupCommit("test-commits")
    release = threading.Event()
    seen: list = []

    def slow_many(items):
        release.wait(5)
        return Job.mark_succeeded_many(items)

    try:
        started = time.monotonic()
        assert commits.run_batched(slow_many, (row[0], result()), then=lambda won: seen.append(won)) is None
        assert time.monotonic() - started < 1 and not seen  # the caller did not wait for the write
        release.set()
    finally:
        commits.stop()  # commits what is waiting, then the callbacks run
    assert seen == [True]
    assert Job.objects.get(pk=row[0].pk).state == JobState.SUCCEEDED


def test_a_batched_write_defers_only_for_a_job_thread_delivery_that_takes_outcomes_late(dev_backend):
    row = Job.claim([str(make_job(dev_backend).pk)], "w1")
    seen: list = []
    # Outside a job thread: a plain call, then the callback, and the value comes back.
    assert DirectWriter().run_batched(Job.mark_succeeded_many, (row[0], result()), then=seen.append) is True
    assert seen == [True]

    # In a job thread whose delivery takes its outcome late: back at once, callback and hook after commit.
    late = Job.claim([str(make_job(dev_backend).pk)], "w1")[0]
    waited = Job.claim([str(make_job(dev_backend).pk)], "w1")[0]
    returned: list = []
    hooked = threading.Event()

    def perform(delivery: ThreadedDelivery) -> None:
        writer = DeliveryWriter(threads.commits, delivery)
        if delivery.job_id == str(waited.pk):  # no hook: the thread waits for its outcome
            returned.append(writer.run_batched(Job.mark_succeeded_many, (waited, result()), then=seen.append))
            returned.append(delivery.outcome_deferred)
            return
        delivery.after_outcome = hooked.set
        returned.append(writer.run_batched(Job.mark_succeeded_many, (late, result()), then=seen.append))
        returned.append(delivery.outcome_deferred)

    connection.close()  # the job thread and the writer have their own connections
    threads = JobThreads(1, perform, "test-worker")
    try:
        threads.submit(_entry(str(late.pk), 0))
        assert hooked.wait(5)
        assert threads.wait_idle(5)
        threads.submit(_entry(str(waited.pk), 0))
        assert threads.wait_idle(5)
    finally:
        threads.stop()
    assert returned == [None, True, True, False] and seen == [True, True, True]
    assert Job.objects.get(pk=late.pk).state == JobState.SUCCEEDED
    assert Job.objects.get(pk=waited.pk).state == JobState.SUCCEEDED


# --- the write-behind buffer ---------------------------------------------------------------------------
def test_write_behind_sums_increments_and_sends_them_in_one_flush():
    client = redis_client()
    buffer = WriteBehind()
    for _ in range(500):
        buffer.hincrby("llmo:test:wb", "jobs", 1)
        buffer.hincrbyfloat("llmo:test:wb", "cost", 0.5)
        buffer.expire("llmo:test:wb", 60)
    client.set("llmo:test:rq-hash", "x")
    buffer.delete("llmo:test:rq-hash")
    assert client.hget("llmo:test:wb", "jobs") is None  # nothing sent yet
    assert buffer.flush() == 4  # HINCRBY, HINCRBYFLOAT, EXPIRE, DEL
    assert int(client.hget("llmo:test:wb", "jobs")) == 500
    assert float(client.hget("llmo:test:wb", "cost")) == 250.0
    assert 0 < client.ttl("llmo:test:wb") <= 60 and not client.exists("llmo:test:rq-hash")
    assert buffer.flush() == 0


# --- claimed jobs waiting for a thread -----------------------------------------------------------------
class _FakeQueue:
    def __init__(self, name: str) -> None:
        self.name = name


def _entry(job_id: str, rank: int) -> ThreadedDelivery:
    return ThreadedDelivery(rq_job=None, queue=_FakeQueue("q"), job_id=job_id, timeout_s=30, rank=rank)


def test_waiting_jobs_go_to_free_threads_highest_priority_first_and_prefetch_adapts():
    order: list[str] = []
    gate = threading.Event()

    def perform(entry: ThreadedDelivery) -> None:
        order.append(entry.job_id)
        gate.wait(5)

    threads = JobThreads(1, perform, "test-worker", prefetch=4)
    try:
        assert threads.waiting_allowed == 0  # no job time known yet: nothing waits
        threads.submit(_entry("first", 2))
        deadline = time.monotonic() + 5
        while not order and time.monotonic() < deadline:
            time.sleep(0.01)
        for job_id, rank in [("low", 2), ("normal", 1), ("high", 0), ("normal-2", 1)]:
            threads.submit(_entry(job_id, rank))
        assert (threads.busy, threads.held) == (1, 5)
        gate.set()
        assert threads.wait_idle(5)
        assert order == ["first", "high", "normal", "normal-2", "low"]
        threads.run_time_s = 0.001  # short jobs: up to `prefetch` may wait
        assert threads.waiting_allowed == 4 and threads.room == 5
        threads.run_time_s = 60.0  # long jobs: none may wait (another worker may be free)
        assert threads.waiting_allowed == 0 and threads.room == 1
    finally:
        threads.stop()


def test_take_back_waiting_returns_the_jobs_no_thread_started():
    gate = threading.Event()
    threads = JobThreads(1, lambda entry: gate.wait(5), "test-worker", prefetch=4)
    try:
        threads.submit(_entry("running", 0))
        deadline = time.monotonic() + 5
        while not threads.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        threads.submit(_entry("b", 1))
        threads.submit(_entry("a", 0))
        assert [e.job_id for e in threads.take_back_waiting()] == ["a", "b"]
        assert [e.job_id for e in threads.snapshot()] == ["running"] and threads.held == 1
        gate.set()
        assert threads.wait_idle(5)
    finally:
        threads.stop()


def test_attempt_rows_match_after_a_batched_claim_and_success(dev_backend):
    rows = Job.claim([str(make_job(dev_backend).pk) for _ in range(3)], "w1")
    assert Job.mark_succeeded_many([(r, result()) for r in rows]) == [True] * 3
    assert JobAttempt.objects.filter(outcome=AttemptOutcome.SUCCEEDED).count() == 3
    assert not JobAttempt.objects.filter(outcome=AttemptOutcome.RUNNING).exists()


# --- several modules' Redis commands in one round trip ---------------------------------------------------
def test_round_trip_runs_scripts_and_commands_and_reloads_a_script_redis_forgot():
    from orchestrator_site.redis import RoundTrip
    from routing import capacity, circuit

    client = redis_client()
    rt = RoundTrip()
    lease, taken = capacity.acquire_in(rt, "rt-backend", 1)
    asked = circuit.allow_in(rt, "rt-backend")
    rt.command("set", "llmo:test:rt", "1")
    client.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT
    rt.execute()
    assert taken.value is True and asked.value == (True, "closed", False)
    assert client.get("llmo:test:rt") == b"1"
    assert capacity.try_acquire("rt-backend", 1) is None  # the slot is really held
    capacity.release(lease)
    assert capacity.try_acquire("rt-backend", 1) is not None


def test_a_deferred_write_the_database_refused_is_tried_again_until_it_answers(dev_backend, monkeypatch):
    """However long the outage: giving up would leave the job running on a live worker for good.
    Meanwhile the write is counted in ``retrying`` (the worker's status shows it)."""
    from django.db import OperationalError

    from workers.runtime import group_commit

    monkeypatch.setattr(group_commit, "RETRY_PAUSE_S", 0.001)
    outage = 150  # tries; the writer used to give up after 120
    row = Job.claim([str(make_job(dev_backend).pk)], "w1")
    commits = GroupCommit("test-commits")
    tries: list[int] = []
    waiting: list[int] = []
    seen: list = []
    done = threading.Event()

    def flaky_many(items):
        tries.append(len(items))
        waiting.append(commits.retrying)
        if len(tries) <= outage:
            raise OperationalError("server closed the connection unexpectedly")
        return Job.mark_succeeded_many(items)

    try:
        commits.run_batched(flaky_many, (row[0], result()), then=lambda won: (seen.append(won), done.set()))
        assert done.wait(30)
    finally:
        commits.stop()
    assert len(tries) == outage + 1 and seen == [True]
    assert waiting[0] == 0 and set(waiting[1:]) == {1} and commits.retrying == 0
    fresh = Job.objects.get(pk=row[0].pk)
    assert fresh.state == JobState.SUCCEEDED and fresh.version == row[0].version  # memory followed the commit


def test_a_failed_commit_leaves_the_instance_as_committed_so_the_write_can_be_retried(dev_backend):
    from django.db import transaction

    row = Job.claim([str(make_job(dev_backend).pk)], "w1")[0]
    version = row.version
    with pytest.raises(RuntimeError), transaction.atomic():
        assert Job.mark_succeeded_many([(row, result())]) == [True]
        raise RuntimeError("the commit fails")
    assert (row.state, row.version) == (JobState.RUNNING, version)  # rolled back: memory unchanged
    assert Job.mark_succeeded_many([(row, result())]) == [True]  # so the retry still holds the fence
    assert (row.state, row.version) == (JobState.SUCCEEDED, version + 1)


def test_the_watcher_flushes_the_summed_figures_while_the_worker_runs(settings):
    settings.WORKER_WATCH_S = 0.05
    threads = JobThreads(1, lambda entry: None, "test-worker")
    try:
        threads.write_behind.hincrby("llmo:test:live", "jobs", 3)
        deadline = time.monotonic() + 5
        while redis_client().hget("llmo:test:live", "jobs") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert redis_client().hget("llmo:test:live", "jobs") == b"3"  # no job ended, no stop: the watcher sent it
    finally:
        threads.stop()


def test_jobs_whose_claim_the_database_refused_go_back_in_order_and_run_once(api, policy):
    """The worker popped three jobs and the database refused their claim (a restart, a failover):
    they go back to the front of their queue in the order they were taken, and run once each.
    The refusal comes from the database boundary of whichever connection claims (the worker's
    own on PostgreSQL, its writer thread's on SQLite)."""
    from django.conf import settings
    from django.db import OperationalError
    from django.db.backends.signals import connection_created

    from workers.runtime.threaded import ThreadedWorker

    ids = []
    for n in range(3):
        r = api.post("/jobs", {"prompt": f"claim {n}"}, format="json")
        assert r.status_code == 202, r.content
        ids.append(r.json()["id"])
    rq_ids = [Job.objects.get(pk=i).rq_job_id for i in ids]
    refused: list[str] = []
    put_back: list[list[str]] = []

    def refuse_first_claim(execute, sql, params, many, context):
        if not refused and sql.startswith("UPDATE") and "RETURNING" in sql:
            refused.append(sql)
            raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    def install(sender, connection, **kwargs):
        connection.execute_wrappers.append(refuse_first_claim)

    def watch_queue() -> None:  # the worker pauses 1 s after putting them back: read the queue then
        client = redis_client()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if refused and len(ids := fair_queue.waiting_ids("normal", client)) == 3:
                put_back.append(ids)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_queue)
    watcher.start()
    connection_created.connect(install)
    connection.execute_wrappers.append(refuse_first_claim)
    try:
        ThreadedWorker(list(settings.JOB_QUEUES), connection=redis_client()).work(burst=True)
    finally:
        connection_created.disconnect(install)
        connection.execute_wrappers.remove(refuse_first_claim)
        watcher.join()
    assert len(refused) == 1 and put_back == [rq_ids]
    jobs = [Job.objects.get(pk=i) for i in ids]
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 3
    assert [j.attempt_count for j in jobs] == [1, 1, 1] and all(j.attempts.count() == 1 for j in jobs)
