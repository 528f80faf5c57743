"""Doing the damage for real: a worker killed with SIGKILL mid-job loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from jobs.models import AttemptOutcome, Job, JobState
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

FAST_RECOVERY = {"WORKER_HEARTBEAT_MS": "300", "WORKER_LEASE_TTL_MS": "1500", "RECONCILE_INTERVAL_MS": "500"}


@pytest.fixture
def workers(worker_process) -> Callable[[], subprocess.Popen]:
    return lambda: worker_process(MAX_CONCURRENCY="4", **FAST_RECOVERY)


def wait_for(job_id: str, state: str, timeout: float) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = Job.objects.get(pk=job_id)
        if job.state == state:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} is {Job.objects.get(pk=job_id).state}, not {state}, after {timeout}s")


@pytest.fixture
def slow_backend(db) -> Backend:
    backend = Backend.objects.create(name="slow", kind=BackendKind.DEV, config={"latency_ms": 3000})
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={}))
    return backend


def test_jobs_of_a_sigkilled_worker_are_rerun_by_another_and_finish_once(api, slow_backend, workers):
    ids = [api.post("/jobs", {"prompt": f"survive {i}"}, format="json").json()["id"] for i in range(3)]
    first = workers()
    lost = {wait_for(i, JobState.RUNNING, timeout=30).worker for i in ids}
    assert len(lost) == 1  # all three in flight in the one process
    os.kill(first.pid, signal.SIGKILL)  # no cleanup, no goodbye: its heartbeat just stops
    first.wait()
    killed_at = time.monotonic()
    workers()
    for i in ids:
        job = wait_for(i, JobState.SUCCEEDED, timeout=60)
        assert job.output == f"survive {ids.index(i)}" and job.attempt_count == 2
        attempts = list(job.attempts.values_list("number", "outcome", "worker", "error"))
        assert attempts[0][:3] == (1, AttemptOutcome.INTERRUPTED, *lost) and "was lost" in attempts[0][3]
        assert attempts[1][:2] == (2, AttemptOutcome.SUCCEEDED) and attempts[1][2] not in lost
    assert time.monotonic() - killed_at < 60
    time.sleep(2)  # a few more reconcile passes: nothing runs them a third time
    assert {Job.objects.get(pk=i).attempt_count for i in ids} == {2}


def test_slow_but_alive_worker_keeps_its_job(api, slow_backend, workers):
    slow_backend.config = {"latency_ms": 4000}  # longer than the 1.5 s lease: only heartbeats keep it
    slow_backend.save()
    job_id = api.post("/jobs", {"prompt": "take your time"}, format="json").json()["id"]
    workers()
    wait_for(job_id, JobState.RUNNING, timeout=30)
    workers()  # a second worker reconciles every 0.5 s meanwhile
    job = wait_for(job_id, JobState.SUCCEEDED, timeout=30)
    assert job.attempt_count == 1 and job.attempts.get().outcome == AttemptOutcome.SUCCEEDED
