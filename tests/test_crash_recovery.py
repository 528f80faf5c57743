"""Doing the damage for real: a worker killed with SIGKILL mid-job loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from jobs.models import AttemptOutcome, Job, JobState
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import ROOT, process_env

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

FAST_RECOVERY = {"WORKER_HEARTBEAT_MS": "300", "WORKER_LEASE_TTL_MS": "1500", "RECONCILE_INTERVAL_MS": "500"}


@pytest.fixture
def workers() -> Iterator[Callable[[], subprocess.Popen]]:
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        cmd = [sys.executable, "manage.py", "rqworker", "high", "normal", "low"]
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=process_env(**FAST_RECOVERY), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


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
    RoutingPolicy.objects.create(name="p", strategy="ordered", params={}).activate()
    return backend


def test_job_of_a_sigkilled_worker_is_rerun_by_another_and_finishes_once(api, slow_backend, workers):
    job_id = api.post("/jobs", {"prompt": "survive this"}, format="json").json()["id"]
    first = workers()
    lost = wait_for(job_id, JobState.RUNNING, timeout=30).worker
    os.kill(first.pid, signal.SIGKILL)  # no cleanup, no goodbye: its heartbeat just stops
    first.wait()
    killed_at = time.monotonic()
    workers()
    job = wait_for(job_id, JobState.SUCCEEDED, timeout=60)
    assert time.monotonic() - killed_at < 60
    assert job.output == "survive this" and job.attempt_count == 2
    attempts = list(job.attempts.values_list("number", "outcome", "worker", "error"))
    assert attempts[0][:3] == (1, AttemptOutcome.INTERRUPTED, lost) and "was lost" in attempts[0][3]
    assert attempts[1][:2] == (2, AttemptOutcome.SUCCEEDED) and attempts[1][2] != lost
    time.sleep(2)  # a few more reconcile passes: nothing runs it a third time
    assert Job.objects.get(pk=job_id).attempt_count == 2


def test_slow_but_alive_worker_keeps_its_job(api, slow_backend, workers):
    slow_backend.config = {"latency_ms": 4000}  # longer than the 1.5 s lease: only heartbeats keep it
    slow_backend.save()
    job_id = api.post("/jobs", {"prompt": "take your time"}, format="json").json()["id"]
    workers()
    wait_for(job_id, JobState.RUNNING, timeout=30)
    workers()  # a second worker reconciles every 0.5 s meanwhile
    job = wait_for(job_id, JobState.SUCCEEDED, timeout=30)
    assert job.attempt_count == 1 and job.attempts.get().outcome == AttemptOutcome.SUCCEEDED
