"""Fallback never hands a job to a pooled backend in a worker outside its pool.

A pooled kind (``hf_local``) runs only in its pool's GPU workers, where its model is resident. When a
job routed to an API backend fails there and the policy's ranking lists a pooled backend next, a
thread worker on the shared queues passes it over (and says why) for the next usable candidate.
"""

from __future__ import annotations

import pytest

from jobs.models import AttemptOutcome, Job, JobState
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import run_worker_burst

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

DOWN = {"fail_rate": 1.0, "fail_status": 503, "retry_max": 0, "circuit_failures": 100}


@pytest.fixture
def pooled(db) -> Backend:
    """A GPU pool's backend. Its model path does not matter: no thread worker may ever load it."""
    return Backend.objects.create(name="tiny", kind=BackendKind.HF_LOCAL, model="/nonexistent/tiny", pool="gpu")


def routed(api, *order: str) -> Job:
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": list(order)}))
    r = api.post("/jobs", {"prompt": "fall back past the pool"}, format="json")
    assert r.status_code == 202, r.content
    job = Job.objects.get(pk=r.json()["id"])
    assert [c["backend"] for c in job.routing["candidates"]] == list(order)  # the pooled one is a candidate
    assert job.queue == "normal"  # the shared queue, where thread workers take it
    return job


def attempts(job: Job) -> list[tuple[str, str]]:
    return [(a.backend_name, a.outcome) for a in job.attempts.order_by("number")]


def test_a_thread_worker_falls_back_past_a_pooled_backend_to_the_next_usable_one(api, pooled):
    Backend.objects.create(name="down", kind=BackendKind.DEV, config=DOWN)
    Backend.objects.create(name="spare", kind=BackendKind.DEV)
    job = routed(api, "down", "tiny", "spare")
    run_worker_burst()
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED, job.error
    assert attempts(job) == [("down", AttemptOutcome.FAILED), ("spare", AttemptOutcome.SUCCEEDED)]


def test_when_only_a_pooled_backend_is_left_the_job_fails_saying_why(api, pooled):
    Backend.objects.create(name="down", kind=BackendKind.DEV, config=DOWN)
    job = routed(api, "down", "tiny")
    run_worker_burst()
    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert attempts(job) == [("down", AttemptOutcome.FAILED)]
    assert "skipped: tiny: runs only in pool 'gpu' workers" in job.error
