"""Retention: `purge_jobs` and the reconciler's periodic pass delete old finished jobs and what hangs off them."""

from __future__ import annotations

import base64
import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from jobs import retention, status_mirror
from jobs.models import Job, JobAttempt, JobImage, JobImageLink, JobState
from tests.factories import make_job
from workers.fleet.reconciler import reconcile

pytestmark = pytest.mark.django_db(transaction=True)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40).decode()
GIF = base64.b64encode(b"GIF89a" + b"\x01" * 40).decode()


def job_aged(days: float, state: str = JobState.SUCCEEDED, images: list[str] = (), attempts: int = 1) -> Job:
    """A job created ``days`` ago (finished then too, when terminal), with attempts, images and a mirror entry."""
    at = timezone.now() - timedelta(days=days)
    terminal = state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED)
    job = make_job(state=state, created_at=at, finished_at=at if terminal else None, image_count=len(images))
    job.attach_images(images)
    for n in range(1, attempts + 1):
        JobAttempt.objects.create(job=job, number=n, outcome="succeeded" if terminal else "running", started_at=at)
    Job.objects.filter(pk=job.pk).update(attempt_count=attempts)
    job.refresh_from_db()
    status_mirror.write(job, job.status_document())
    return job


def mirrored(redis_db, *jobs: Job) -> list[bool]:
    return [bool(redis_db.exists(status_mirror.cache_key(j.pk))) for j in jobs]


def purge_command(*args: str) -> str:
    out = io.StringIO()
    call_command("purge_jobs", *args, stdout=out)
    return out.getvalue().strip()


def test_dry_run_deletes_nothing_and_prints_what_would_go(redis_db):
    old = [job_aged(40, images=[PNG, GIF], attempts=2), job_aged(35, JobState.FAILED, images=[PNG])]
    job_aged(5, images=[GIF])  # recent: keeps GIF referenced

    out = purge_command("--older-than", "30", "--dry-run")

    assert out == "would delete 2 job(s), 3 attempt(s), 1 image(s), 2 status mirror entries"
    assert Job.objects.count() == 3 and JobAttempt.objects.count() == 4 and JobImage.objects.count() == 2
    assert mirrored(redis_db, *old) == [True, True]


def test_purge_deletes_old_finished_jobs_with_attempts_images_and_mirror_entries(redis_db):
    old = [
        job_aged(40, images=[PNG], attempts=2),
        job_aged(31, JobState.FAILED),
        job_aged(60, JobState.CANCELED, attempts=0),
    ]

    out = purge_command("--older-than", "30")

    assert out == "deleted 3 job(s), 3 attempt(s), 1 image(s), 3 status mirror entries"
    assert not Job.objects.exists() and not JobAttempt.objects.exists()
    assert not JobImage.objects.exists() and not JobImageLink.objects.exists()
    assert mirrored(redis_db, *old) == [False, False, False]


def test_queued_and_running_jobs_are_never_deleted_however_old(redis_db):
    queued = job_aged(400, JobState.QUEUED, images=[PNG], attempts=0)
    running = job_aged(400, JobState.RUNNING)

    assert purge_command("--older-than", "0") == "deleted 0 job(s), 0 attempt(s), 0 image(s), 0 status mirror entries"
    assert set(Job.objects.values_list("pk", flat=True)) == {queued.pk, running.pk}
    assert queued.image_payloads() == [PNG] and JobAttempt.objects.filter(job=running).exists()
    assert mirrored(redis_db, queued, running) == [True, True]


def test_a_job_finished_recently_stays_even_if_created_long_ago(redis_db):
    job = job_aged(40)
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timedelta(days=1))  # an operator's late retry
    assert retention.purge(timedelta(days=30)).jobs == 0
    assert Job.objects.filter(pk=job.pk).exists()


def test_a_shared_image_survives_while_a_kept_job_links_to_it():
    job_aged(40, images=[PNG, GIF])
    kept = job_aged(2, images=[GIF])

    counts = retention.purge(timedelta(days=30))

    assert (counts.jobs, counts.images) == (1, 1)
    assert kept.image_payloads() == [GIF]
    assert list(JobImage.objects.values_list("media_type", flat=True)) == ["image/gif"]


def test_purge_goes_through_many_batches_oldest_first():
    jobs = [job_aged(40 + i, images=[PNG]) for i in range(7)]
    kept = job_aged(1, images=[PNG])

    counts = retention.purge(timedelta(days=30), batch_size=2)

    assert (counts.jobs, counts.attempts, counts.images, counts.mirror_entries) == (7, 7, 0, 7)
    assert list(Job.objects.values_list("pk", flat=True)) == [kept.pk]
    assert not Job.objects.filter(pk__in=[j.pk for j in jobs]).exists()
    assert kept.image_payloads() == [PNG]


def test_a_time_budget_stops_between_batches_and_says_more_is_left():
    for i in range(3):
        job_aged(40 + i)
    counts = retention.purge(timedelta(days=30), batch_size=1, budget_s=0)
    assert (counts.jobs, counts.complete) == (0, False)
    assert Job.objects.count() == 3


def test_a_pause_between_batches_still_purges_everything(monkeypatch):
    for i in range(3):
        job_aged(40 + i)
    pauses: list[float] = []
    monkeypatch.setattr(retention.time, "sleep", pauses.append)  # count the pauses, do not wait them out
    out = purge_command("--older-than", "30", "--batch-size", "1", "--pause-ms", "40")
    assert "deleted 3 job(s)" in out and not Job.objects.exists()
    assert pauses == [0.04, 0.04, 0.04]


def test_the_reconciler_pass_purges_by_job_retention_days_at_most_once_per_interval(settings, redis_db):
    settings.JOB_RETENTION_DAYS = 30
    job_aged(45, images=[PNG])
    reconcile()
    assert not Job.objects.exists() and not JobImage.objects.exists()
    assert redis_db.ttl(retention.PERIODIC_LOCK) > 0  # held for the interval, fleet-wide

    late = job_aged(45)
    reconcile()
    assert Job.objects.filter(pk=late.pk).exists()  # within the interval: no second pass

    redis_db.delete(retention.PERIODIC_LOCK)  # the interval is over
    reconcile()
    assert not Job.objects.exists()


def test_job_retention_days_zero_keeps_everything(settings, redis_db):
    settings.JOB_RETENTION_DAYS = 0
    job = job_aged(4000)
    reconcile()
    assert Job.objects.filter(pk=job.pk).exists()
    assert not redis_db.exists(retention.PERIODIC_LOCK)


@pytest.mark.parametrize(
    "args",
    [["--older-than", "-1"], ["--older-than", "3", "--batch-size", "0"], ["--older-than", "3", "--pause-ms", "-5"]],
)
def test_purge_command_refuses_nonsense(args):
    with pytest.raises(CommandError):
        call_command("purge_jobs", *args)
