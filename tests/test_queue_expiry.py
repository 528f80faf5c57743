"""Queue timeouts: a job not started in time ends ``expired`` with no backend call and no attempt,
whether a worker takes it or the reconciler finds it with no worker running; an operator retry
gives it a fresh timeout."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from dashboard import aggregates
from jobs import fair_queue, queueing, status_mirror
from jobs.models import Job, JobState
from orchestrator_site import metrics
from tests.conftest import run_worker_burst
from tests.factories import make_job
from tests.test_metrics import metrics_token, scrape, value  # noqa: F401 (metrics_token: an autouse fixture)
from workers.fleet import reconciler


def waiting_job(backend, *, expires_in_s: float, **fields) -> Job:
    job = make_job(backend, queue_timeout_s=1, expires_at=timezone.now() + timedelta(seconds=expires_in_s), **fields)
    queueing.enqueue(job)
    return job


@pytest.mark.django_db(transaction=True)
def test_the_reconciler_expires_overdue_jobs_with_no_worker_running(dev_backend):
    overdue = [waiting_job(dev_backend, expires_in_s=-1) for _ in range(3)]
    fresh = waiting_job(dev_backend, expires_in_s=60)
    untimed = make_job(dev_backend)
    assert reconciler.expire_overdue() == 3
    for job in overdue:
        job.refresh_from_db()
        assert job.state == JobState.EXPIRED and job.attempt_count == 0 and job.finished_at is not None
        assert "queue timeout (1 s)" in job.error
        assert not job.attempts.exists()
        assert status_mirror.read(job.pk)["state"] == "expired"
    assert fair_queue.waiting_ids("normal") == [fresh.rq_job_id]  # expired jobs gave up their places
    assert Job.objects.get(pk=untimed.pk).state == JobState.QUEUED
    assert reconciler.expire_overdue() == 0


@pytest.mark.django_db(transaction=True)
def test_expired_jobs_are_not_pushed_again_by_the_reconciler(dev_backend):
    job = waiting_job(dev_backend, expires_in_s=-1)
    fair_queue.redis_client().flushdb()
    assert reconciler.reconcile(min_age_s=0)[0] == 0
    assert Job.objects.get(pk=job.pk).state == JobState.EXPIRED


@pytest.mark.django_db(transaction=True)
def test_a_claim_never_starts_an_expired_job(dev_backend):
    job = waiting_job(dev_backend, expires_in_s=-1)
    assert Job.claim([str(job.pk)], "w") == []
    assert Job.objects.get(pk=job.pk).state == JobState.QUEUED  # left for expire_due, not started


@pytest.mark.django_db(transaction=True)
def test_an_operator_retry_starts_a_new_queue_timeout(dev_backend):
    job = waiting_job(dev_backend, expires_in_s=-1)
    reconciler.expire_overdue()
    job.refresh_from_db()
    assert job.requeue()
    job.refresh_from_db()
    assert job.state == JobState.QUEUED and job.expires_at > timezone.now()


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_worker_that_takes_an_overdue_job_expires_it_without_calling_the_backend(dev_backend):
    overdue = [waiting_job(dev_backend, expires_in_s=-1) for _ in range(5)]
    ok = make_job(dev_backend)
    queueing.enqueue(ok)
    run_worker_burst(RECONCILE_INTERVAL_MS="0")  # no reconcile pass: the worker expires them
    for job in overdue:
        job.refresh_from_db()
        assert (job.state, job.attempt_count, job.worker) == (JobState.EXPIRED, 0, "")
    assert Job.objects.get(pk=ok.pk).state == JobState.SUCCEEDED


@pytest.mark.django_db(transaction=True)
def test_expired_jobs_count_in_the_metrics_and_the_dashboard(dev_backend):
    for _ in range(2):
        waiting_job(dev_backend, expires_in_s=-1)
    reconciler.expire_overdue()
    samples = scrape("fleet")
    assert value(samples, metrics.PREFIX + "jobs_finished_total", backend="dev", outcome="expired") == 2
    pipe = fair_queue.redis_client().pipeline(transaction=False)
    parse = aggregates.queue_read(pipe, timezone.now())
    assert sum(parse(pipe.execute()).per_minute("expired")) == 2
