"""A job that got a 2xx survives Redis losing everything: the reconciler re-enqueues it from the DB."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from jobs import fair_queue
from jobs.models import Job, JobState
from orchestrator_site.redis import redis_client
from tests.conftest import run_worker_burst
from workers.fleet import liveness, reconciler

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_jobs_survive_a_redis_flush(api, policy, capsys):
    ids = [
        api.post("/jobs", {"prompt": f"p{i}", "priority": p}, format="json").json()["id"]
        for i, p in enumerate(["high", "normal", "low"] * 4)
    ]
    redis_client().flushdb()  # every queue entry, RQ job and status mirror is gone
    run_worker_burst()
    assert set(Job.objects.filter(pk__in=ids).values_list("state", flat=True)) == {JobState.QUEUED}
    call_command("reconcile", min_age=0)
    assert "re-enqueued 12 job(s)" in capsys.readouterr().out
    run_worker_burst()
    jobs = Job.objects.filter(pk__in=ids)
    assert {j.state for j in jobs} == {JobState.SUCCEEDED}
    assert all(j.attempt_count == 1 for j in jobs)  # each ran exactly once
    r = api.get(f"/jobs/{ids[0]}/result")
    assert r.status_code == 200 and r.json()["output"] == "p0"


def test_reconcile_leaves_enqueued_and_young_jobs_alone(api, policy, capsys):
    api.post("/jobs", {"prompt": "fresh"}, format="json")
    call_command("reconcile", min_age=0)
    assert "re-enqueued 0 job(s)" in capsys.readouterr().out  # its RQ job exists
    redis_client().flushdb()
    call_command("reconcile", min_age=60)
    assert "re-enqueued 0 job(s)" in capsys.readouterr().out  # too young to judge
    assert len(fair_queue.waiting_ids("normal")) == 0


def _running_on_a_dead_worker(api, attempts: int) -> Job:
    job_id = api.post("/jobs", {"prompt": "orphan"}, format="json").json()["id"]
    job = Job.objects.get(pk=job_id)
    for n in range(attempts):
        if n:
            job.requeue_lost("earlier loss")
        job.mark_running("ghost.1")  # no heartbeat key: this worker is gone
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(minutes=5))
    # An earlier pass saw its key missing a minute ago: the grace has passed.
    redis_client().set(reconciler.missing_key("ghost.1"), f"{time.time() - 60:.6f}")
    return Job.objects.get(pk=job.pk)


def test_a_worker_whose_key_just_vanished_is_given_a_grace_before_its_jobs_move(api, policy, settings):
    """Right after a Redis restart no liveness key exists; a live worker writes its key back within a beat."""
    job = _running_on_a_dead_worker(api, attempts=1)
    redis_client().delete(reconciler.missing_key("ghost.1"))  # first pass to notice
    assert reconciler.reconcile(min_age_s=0)[1:] == (0, 0)
    liveness.beat("ghost.1")  # the worker is back
    assert reconciler.reconcile(min_age_s=0)[1:] == (0, 0)
    assert not redis_client().exists(reconciler.missing_key("ghost.1"))  # the next absence starts afresh
    redis_client().delete(liveness.alive_key("ghost.1"), liveness.seen_key("ghost.1"))  # lost again
    settings.WORKER_HEARTBEAT_S = 0.2
    assert reconciler.reconcile(min_age_s=0)[1:] == (0, 0)
    time.sleep(1.1)  # the grace is two beats, at least 1 s
    assert reconciler.reconcile(min_age_s=0)[1:] == (1, 0)
    job.refresh_from_db()
    assert job.state == JobState.QUEUED


def test_a_worker_whose_key_expired_is_dead_at_once(api, policy):
    job = _running_on_a_dead_worker(api, attempts=1)
    redis_client().delete(reconciler.missing_key("ghost.1"))
    liveness.beat("ghost.1")
    redis_client().delete(liveness.alive_key("ghost.1"))  # expired: no beat for a lease TTL
    assert reconciler.reconcile(min_age_s=0)[1:] == (1, 0)
    job.refresh_from_db()
    assert job.state == JobState.QUEUED


def test_a_queued_job_popped_by_a_worker_that_died_before_claiming_it_is_pushed_again(api, policy, capsys):
    job_id = api.post("/jobs", {"prompt": "popped"}, format="json").json()["id"]
    assert [t.job_id for t in fair_queue.take(["normal"])] == [job_id]  # the worker took it, then died
    call_command("reconcile", min_age=0)
    assert "re-enqueued 1 job(s)" in capsys.readouterr().out
    run_worker_burst()
    assert Job.objects.get(pk=job_id).state == JobState.SUCCEEDED


def test_running_job_of_a_dead_worker_is_requeued(api, policy, capsys):
    job = _running_on_a_dead_worker(api, attempts=1)
    call_command("reconcile", min_age=0)
    assert "recovered 1 running job(s) from lost workers; failed 0" in capsys.readouterr().out
    job.refresh_from_db()
    assert job.state == JobState.QUEUED and job.worker == ""
    assert job.attempts.get().outcome == "interrupted"
    run_worker_burst()
    assert Job.objects.get(pk=job.pk).state == JobState.SUCCEEDED


def test_a_job_whose_workers_keep_dying_fails_after_max_deliveries(api, policy, settings, capsys):
    settings.MAX_DELIVERIES = 3
    job = _running_on_a_dead_worker(api, attempts=3)
    call_command("reconcile", min_age=0)
    assert "failed 1" in capsys.readouterr().out
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "gave up after 3 deliveries" in job.error
