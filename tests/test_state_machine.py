"""The job state machine: legal moves only, compare-and-set under races, and a status
mirror in Redis that never moves backwards."""

from __future__ import annotations

import threading

import pytest
from django.db import close_old_connections, connection

from jobs import status_mirror
from jobs.models import TERMINAL_STATES, TRANSITIONS, AttemptOutcome, Job, JobState
from tests.factories import make_job

pytestmark = pytest.mark.django_db(transaction=True)


def succeed(job: Job) -> bool:
    return job.mark_succeeded(
        output="ok", finish_reason="stop", prompt_tokens=1, completion_tokens=1, latency_ms=5, cost=None
    )


def test_happy_path_records_attempt_and_timings(dev_backend):
    job = make_job(dev_backend)
    assert job.mark_running("w1")
    assert job.state == JobState.RUNNING and job.started_at and job.attempt_count == 1
    assert succeed(job)
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and job.finished_at >= job.started_at
    attempt = job.attempts.get()
    assert (attempt.number, attempt.worker, attempt.outcome) == (1, "w1", AttemptOutcome.SUCCEEDED)
    assert attempt.finished_at is not None


def test_duplicate_delivery_is_a_noop(dev_backend):
    job = make_job(dev_backend)
    assert job.mark_running("w1")
    again = Job.objects.get(pk=job.pk)
    assert not Job.objects.get(pk=job.pk).mark_running("w2")
    assert again.attempts.count() == 1


def test_terminal_states_cannot_be_left_except_by_requeue(dev_backend):
    job = make_job(dev_backend)
    job.mark_running("w")
    succeed(job)
    assert not job.mark_running("w")
    assert not job.cancel()
    assert not job.mark_failed("late")
    assert not job.requeue()  # succeeded is final
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and job.error == ""


def test_transition_table_never_leaves_succeeded():
    assert all(JobState.SUCCEEDED not in sources for target, sources in TRANSITIONS.items())
    assert {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED} == TERMINAL_STATES


def test_result_arriving_after_cancel_is_discarded(dev_backend):
    job = make_job(dev_backend)
    job.mark_running("w")
    Job.objects.get(pk=job.pk).cancel()
    assert not succeed(job)
    job.refresh_from_db()
    assert job.state == JobState.CANCELED and job.output == ""
    assert job.attempts.get().outcome == AttemptOutcome.CANCELED


def test_canceled_queued_job_is_never_started(dev_backend):
    job = make_job(dev_backend)
    assert job.cancel()
    assert not job.mark_running("w")
    assert job.attempts.count() == 0


def test_failed_job_can_be_requeued_and_keeps_history(dev_backend):
    job = make_job(dev_backend)
    job.mark_running("w1")
    job.mark_failed("boom")
    assert job.requeue()
    assert job.state == JobState.QUEUED and job.error == "" and job.finished_at is None
    assert job.mark_running("w2")
    assert succeed(job)
    outcomes = list(job.attempts.values_list("number", "outcome"))
    assert outcomes == [(1, AttemptOutcome.FAILED), (2, AttemptOutcome.SUCCEEDED)]


def test_concurrent_claims_have_exactly_one_winner(dev_backend):
    job = make_job(dev_backend)
    barrier = threading.Barrier(6)
    wins: list[bool] = []

    def claim(n: int) -> None:
        try:
            barrier.wait()
            wins.append(Job.objects.get(pk=job.pk).mark_running(f"w{n}"))
        finally:
            close_old_connections()
            connection.close()

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 5 + [True]
    assert Job.objects.get(pk=job.pk).attempts.count() == 1


def test_status_mirror_follows_every_transition(dev_backend):
    job = make_job(dev_backend)
    job.mark_running("w")
    assert status_mirror.read(job.pk)["state"] == "running"
    succeed(job)
    doc = status_mirror.read(job.pk)
    assert doc["state"] == "succeeded" and doc["output"] == "ok" and doc["attempts"] == 1


def test_status_mirror_never_moves_backwards(dev_backend):
    job = make_job(dev_backend)
    job.mark_running("w")
    stale = Job.objects.get(pk=job.pk)  # version of the running state
    succeed(job)
    status_mirror.write(stale, stale.status_document())  # a late writer with an older version
    assert status_mirror.read(job.pk)["state"] == "succeeded"


def test_requeued_job_does_not_show_its_old_terminal_state(dev_backend):
    job = make_job(dev_backend)
    job.mark_running("w")
    job.mark_failed("boom")
    assert status_mirror.read(job.pk)["state"] == "failed"
    job.requeue()
    assert status_mirror.read(job.pk)["state"] == "queued"


def test_text_a_backend_sends_with_nul_is_kept_on_every_database(dev_backend):
    """PostgreSQL refuses NUL in text; a byte-level model or an API can send one."""
    done, failed = make_job(dev_backend), make_job(dev_backend)
    assert done.mark_running("w1") and failed.mark_running("w1")
    assert done.mark_succeeded(
        output="a\x00b", finish_reason="stop", prompt_tokens=1, completion_tokens=2, latency_ms=5, cost=None
    )
    assert failed.mark_failed("bad \x00 byte", traceback="Traceback \x00")
    done.refresh_from_db()
    failed.refresh_from_db()
    assert done.output == "a\ufffdb" and failed.error == "bad \ufffd byte"
    assert failed.attempts.get().traceback == "Traceback \ufffd"
