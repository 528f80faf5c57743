"""A job's whole path through real `manage.py rqworker` processes on the real Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from django.conf import settings
from rq.job import Job as RQJob

from jobs.models import AttemptOutcome, Job, JobState
from orchestrator_site.redis import redis_client
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import ROOT, process_env, run_worker_burst

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def submit(api, **body) -> str:
    if "messages" not in body:
        body.setdefault("prompt", "hello world")
    r = api.post("/jobs", body, format="json")
    assert r.status_code == 202, r.content
    return r.json()["id"]


def test_rq_job_carries_only_the_job_id_as_json(api, policy):
    job_id = submit(api, priority="high")
    raw = redis_client().hget(f"rq:job:{job_id}", "data")
    payload = json.loads(__import__("zlib").decompress(raw))  # rq stores the serialized call zlib-compressed
    assert payload[0] == "workers.execution.job_run.run_job"
    assert payload[2] == [job_id] and payload[3] == {}
    assert RQJob.fetch(job_id, connection=redis_client(), serializer="rq.serializers.JSONSerializer").origin == "high"


def test_a_job_enqueued_under_the_tasks_old_path_still_runs(api, policy):
    """RQ jobs enqueued before the task moved (and before the fair queue) may still wait on RQ's own
    list: a worker takes them from there and runs them as its own."""
    from jobs import fair_queue, queueing

    job_id = submit(api)
    job = Job.objects.get(pk=job_id)
    queue = queueing.get_queue(job.queue)
    fair_queue.remove(job.queue, fair_queue.tenant_key(job.tenant_id), job.rq_job_id)
    queue.enqueue_call(queueing.LEGACY_TASKS[0], args=(job_id,), job_id=job.rq_job_id, timeout=job.timeout_s + 30)
    run_worker_burst()
    job.refresh_from_db()
    assert (job.state, job.output) == (JobState.SUCCEEDED, "hello world")
    assert not redis_client().exists(f"rq:job:{job.rq_job_id}")  # our own path: the hash goes with the job


def test_cost_uses_the_backends_prices(api, db):
    backend = Backend.objects.create(
        name="priced", kind=BackendKind.DEV, cost_input_per_1k="2.0", cost_output_per_1k="4.0"
    )
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["priced"]}))
    job_id = submit(api, prompt="one two three four")
    run_worker_burst()
    job = Job.objects.get(pk=job_id)
    assert job.backend == backend
    assert float(job.cost) == pytest.approx((4 * 2.0 + 4 * 4.0) / 1000)


@pytest.mark.parametrize(("status", "tries"), [(503, 3), (400, 1)])
def test_backend_error_fails_job_with_message_and_attempts(api, db, status, tries):
    """A retryable error is tried 1 + retry_max times (default 2 retries); a permanent one once."""
    config = {"fail_rate": 1.0, "fail_status": status, "retry_base_ms": 1}
    Backend.objects.create(name="flaky", kind=BackendKind.DEV, config=config)
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={}))
    job_id = submit(api)
    run_worker_burst()
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.FAILED
    assert f"HTTP {status}" in job.error and "flaky" in job.error
    assert job.attempts.count() == job.attempt_count == tries
    for attempt in job.attempts.all():
        assert attempt.outcome == AttemptOutcome.FAILED and f"HTTP {status}" in attempt.error
    r = api.get(f"/jobs/{job_id}/result")
    assert r.status_code == 200
    result = r.json()
    assert (result["state"], result["backend"], result["output"], result["error"]) == ("failed", "flaky", "", job.error)
    doc = api.get(f"/jobs/{job_id}").json()
    assert doc["state"] == "failed" and doc["error"] == job.error and doc["finished_at"]


def test_job_over_its_deadline_fails_with_a_clear_error(api, db):
    Backend.objects.create(name="slow", kind=BackendKind.DEV, config={"latency_ms": 3000})
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={}))
    job_id = submit(api, timeout_s=1)
    t0 = time.monotonic()
    run_worker_burst()
    assert time.monotonic() - t0 < 20
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.FAILED and "timed out" in job.error


def test_max_tokens_truncates_and_reports_length(api, policy):
    job_id = submit(api, prompt="a b c d e f", max_tokens=2)
    run_worker_burst()
    job = Job.objects.get(pk=job_id)
    assert (job.output, job.finish_reason, job.completion_tokens) == ("a b", "length", 2)


def test_several_workers_and_the_api_write_sqlite_at_once_without_lock_errors(api, db):
    """The embedded SQLite default under concurrent writers: WAL, busy timeout, IMMEDIATE."""
    Backend.objects.create(name="dev", kind=BackendKind.DEV, config={"latency_ms": 0})
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={}))
    ids = [submit(api, prompt=f"job {i}") for i in range(60)]
    cmd = [sys.executable, "manage.py", "rqworker", *settings.JOB_QUEUES, "--burst"]
    workers = [
        subprocess.Popen(cmd, cwd=ROOT, env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(3)
    ]
    ids += [submit(api, prompt=f"late {i}") for i in range(30)]  # the API writes while workers write
    logs = [w.communicate(timeout=120)[0] for w in workers]
    run_worker_burst()  # whatever arrived after the first three went idle
    assert all(w.returncode == 0 for w in workers), logs
    assert not any("locked" in log for log in logs), logs
    states = set(Job.objects.filter(pk__in=ids).values_list("state", flat=True))
    assert states == {JobState.SUCCEEDED}
    assert Job.objects.filter(pk__in=ids, attempt_count=1).count() == len(ids)
