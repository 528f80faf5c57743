"""The version fence: only the run that holds the job's current version can end it.

A run whose job was recovered as lost (its heartbeat lapsed, the reconciler re-queued it) and then
claimed by another worker holds a stale version. Every write of its outcome must lose: the one-job
forms, the batched ones the thread workers' group commit and the GPU worker use, a retry or a
fallback it starts, a re-queue of its own. The current run must still win.
"""

from __future__ import annotations

import pytest

from jobs.models import AttemptOutcome, Job, JobState
from routing.models import Backend
from tests.factories import make_job

pytestmark = pytest.mark.django_db(transaction=True)

LATE = {"output": "late", "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 5}


def lost_and_claimed_again(backend: Backend) -> tuple[Job, Job]:
    """A job claimed by w1, recovered the way the reconciler does it (a fresh read, then
    ``requeue_lost``) and claimed by w2: (w1's object, now stale; w2's object, current)."""
    job = make_job(backend)
    [stale] = Job.claim([job.pk], "w1")
    recovered = Job.objects.get(pk=job.pk)
    assert recovered.requeue_lost("worker w1 was lost while running this job (no heartbeat)")
    [current] = Job.claim([job.pk], "w2")
    assert stale.state == current.state == JobState.RUNNING and stale.version < current.version
    return stale, current


def assert_current_run_untouched(job_id) -> None:
    job = Job.objects.get(pk=job_id)
    assert (job.state, job.worker, job.output, job.error, job.attempt_count) == (JobState.RUNNING, "w2", "", "", 2)
    assert list(job.attempts.values_list("number", "worker", "outcome")) == [
        (1, "w1", AttemptOutcome.INTERRUPTED),
        (2, "w2", AttemptOutcome.RUNNING),
    ]


def succeeded_by_current_run(job_id) -> None:
    job = Job.objects.get(pk=job_id)
    assert (job.state, job.output, job.worker) == (JobState.SUCCEEDED, "current", "w2")
    assert job.attempts.get(number=2).outcome == AttemptOutcome.SUCCEEDED
    assert job.attempts.get(number=1).outcome == AttemptOutcome.INTERRUPTED


def test_a_stale_run_cannot_succeed_and_the_current_run_can(dev_backend):
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.mark_succeeded(**LATE, cost=None)
    assert_current_run_untouched(current.pk)
    assert current.mark_succeeded(**{**LATE, "output": "current"}, cost=None)
    succeeded_by_current_run(current.pk)


def test_a_stale_run_cannot_fail_the_job_and_the_current_run_can_finish_it(dev_backend):
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.mark_failed("late failure of the lost run", latency_ms=5)
    assert_current_run_untouched(current.pk)
    assert current.mark_succeeded(**{**LATE, "output": "current"}, cost=None)
    succeeded_by_current_run(current.pk)


def test_a_stale_crash_record_cannot_fail_the_job(dev_backend):
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.mark_failed("unexpected KeyError", outcome=AttemptOutcome.ERRORED, traceback="Traceback ...")
    assert_current_run_untouched(current.pk)
    assert current.mark_failed("current failure")
    job = Job.objects.get(pk=current.pk)
    assert (job.state, job.error) == (JobState.FAILED, "current failure")
    assert job.attempts.get(number=2).traceback == ""


def test_in_a_batched_success_write_the_stale_run_loses_and_the_others_win(dev_backend):
    """The write the group commit and the GPU worker's rounds make: one statement for many rows."""
    stale, current = lost_and_claimed_again(dev_backend)
    [fresh] = Job.claim([make_job(dev_backend).pk], "w1")
    won = Job.mark_succeeded_many([(stale, {**LATE, "cost": None}), (fresh, {**LATE, "cost": None})])
    assert won == [False, True]
    assert_current_run_untouched(current.pk)
    assert Job.objects.get(pk=fresh.pk).state == JobState.SUCCEEDED
    assert Job.mark_succeeded_many([(current, {**LATE, "output": "current", "cost": None})]) == [True]
    succeeded_by_current_run(current.pk)


def test_a_batch_of_only_stale_runs_writes_nothing(dev_backend):
    runs = [lost_and_claimed_again(dev_backend) for _ in range(3)]
    assert Job.mark_succeeded_many([(stale, {**LATE, "cost": None}) for stale, _ in runs]) == [False] * 3
    for _, current in runs:
        assert_current_run_untouched(current.pk)


def test_transition_many_is_fenced_on_the_version_it_holds(dev_backend):
    stale, current = lost_and_claimed_again(dev_backend)
    winners: list[list[Job]] = []
    assert Job.transition_many(JobState.FAILED, [(stale, {"error": "late"})], then=winners.append) == [False]
    assert winners == [[]]  # nothing to close: the stale run's attempt is not touched
    assert_current_run_untouched(current.pk)
    assert Job.transition_many(JobState.FAILED, [(current, {"error": "current"})]) == [True]
    assert Job.objects.get(pk=current.pk).error == "current"


def test_a_stale_run_cannot_requeue_the_current_run(dev_backend):
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.requeue_lost("worker w1 shut down before the job finished; re-queued")
    assert_current_run_untouched(current.pk)


def test_a_stale_run_cannot_start_a_retry(dev_backend):
    """A lost run whose call failed goes on to retry: that must not take the job back from the current run."""
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.start_attempt(dev_backend, "w1")
    assert_current_run_untouched(current.pk)
    assert current.mark_succeeded(**{**LATE, "output": "current"}, cost=None)
    succeeded_by_current_run(current.pk)


def test_a_stale_run_cannot_fall_back_to_another_backend(dev_backend):
    other = Backend.objects.create(name="other", kind=dev_backend.kind)
    stale, current = lost_and_claimed_again(dev_backend)
    assert not stale.start_attempt(other, "w1", reuse_current=True)
    assert_current_run_untouched(current.pk)
    assert Job.objects.get(pk=current.pk).backend_name == dev_backend.name
