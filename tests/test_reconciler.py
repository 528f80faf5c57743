"""A job that got a 2xx survives Redis losing everything: the reconciler re-enqueues it from the DB."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from jobs.models import Job, JobState
from orchestrator_site.redis import redis_client
from tests.conftest import run_worker_burst

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
    assert redis_client().llen("rq:queue:normal") == 0
