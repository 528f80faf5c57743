"""Doing the damage for real to a worker with jobs in flight: SIGTERM, cancel, a stuck call, Redis restarts."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from jobs import fair_queue
from jobs.models import AttemptOutcome, Job, JobState
from orchestrator_site.redis import redis_client
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import ROOT, process_env, run_worker_burst
from tests.conftest import submit_jobs as submit

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

FAST = {"WORKER_HEARTBEAT_MS": "300", "WORKER_LEASE_TTL_MS": "1500", "RECONCILE_INTERVAL_MS": "1000"}


def wait_until(what: str, check, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    log = proc.log_path.read_text()[-4000:] if proc is not None else ""  # type: ignore[attr-defined]
    raise AssertionError(f"not within {timeout}s: {what}\n{log}")


def states(ids: list[str]) -> list[str]:
    return [Job.objects.get(pk=i).state for i in ids]


@pytest.fixture
def backend(db) -> Backend:
    backend = Backend.objects.create(name="dev", kind=BackendKind.DEV, config={"latency_ms": 200})
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={}))
    return backend


def set_latency(backend: Backend, **config) -> None:
    backend.config = config
    backend.save()


def test_sigterm_finishes_running_jobs_within_the_grace_requeues_the_rest_and_exits_0(api, backend, worker_process):
    Backend.objects.create(name="slow", kind=BackendKind.DEV, config={"latency_ms": 60_000})
    short = submit(api, 2, priority="high", backend="dev")
    long = submit(api, 2, priority="high", backend="slow")
    set_latency(backend, latency_ms=800)
    worker = worker_process(MAX_CONCURRENCY="4", WORKER_SHUTDOWN_GRACE_MS="2500", **FAST)
    wait_until("all four running", lambda: states(short + long) == ["running"] * 4, 30, worker)
    waiting = submit(api, 3, priority="low", backend="dev")  # no free slot: never taken after the signal
    worker.send_signal(signal.SIGTERM)
    signaled = time.monotonic()
    assert worker.wait(timeout=30) == 0, worker.log_path.read_text()[-4000:]
    assert time.monotonic() - signaled < 10  # the 2.5 s grace, not the 60 s job
    assert states(short) == ["succeeded"] * 2  # finished inside the grace
    for job in Job.objects.filter(pk__in=long):
        assert job.state == JobState.QUEUED and job.worker == ""
        attempt = job.attempts.get()
        assert attempt.outcome == AttemptOutcome.INTERRUPTED and "shut down" in attempt.error
    assert all(Job.objects.get(pk=i).attempt_count == 0 for i in waiting)
    queued = [i.encode() for i in fair_queue.waiting_ids("high")]
    assert {j.encode() for j in long} <= set(queued)  # back on their queue, no reconciler needed
    Backend.objects.filter(name="slow").update(config={"latency_ms": 10})
    run_worker_burst(MAX_CONCURRENCY="4")
    for job in Job.objects.filter(pk__in=long + waiting):
        assert job.state == JobState.SUCCEEDED
    assert [Job.objects.get(pk=i).attempt_count for i in long] == [2, 2]


def test_sigterm_while_idle_exits_0_at_once(worker_process, db):
    worker = worker_process(**FAST)
    # Registered with RQ: its signal handlers are in place (a fixed sleep lost the race on a busy machine).
    name = f"{socket.gethostname()}.{worker.pid}"
    wait_until("the worker registered", lambda: redis_client().exists(f"rq:worker:{name}"), 30, worker)
    time.sleep(0.3)  # on to the blocking dequeue
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0


def test_cancel_interrupts_a_running_job_and_frees_its_slot(api, backend, worker_process):
    set_latency(backend, latency_ms=60_000)
    [stuck] = submit(api, 1)
    worker = worker_process(MAX_CONCURRENCY="1", **FAST)
    wait_until("running", lambda: states([stuck]) == ["running"], 30, worker)
    set_latency(backend, latency_ms=10)
    [next_job] = submit(api, 1)
    r = api.post(f"/jobs/{stuck}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "canceled"
    # The one slot was held by the 60 s call: the next job can only run if the call stopped.
    wait_until("the next job ran in the freed slot", lambda: states([next_job]) == ["succeeded"], 15, worker)
    job = Job.objects.get(pk=stuck)
    assert job.state == JobState.CANCELED and job.output == ""
    assert job.attempts.get().outcome == AttemptOutcome.CANCELED
    assert redis_client().zcard("llmo:inflight:dev") == 0


def test_a_call_stuck_past_the_deadline_is_failed_and_its_slot_freed(api, backend, worker_process):
    set_latency(backend, hang_ms=40_000)  # ignores its timeout and the cancel
    r = api.post("/jobs", {"prompt": "stuck", "timeout_s": 1}, format="json")
    stuck = r.json()["id"]
    worker = worker_process(MAX_CONCURRENCY="1", WORKER_STUCK_GRACE_MS="1500", **FAST)
    wait_until("running", lambda: states([stuck]) == ["running"], 30, worker)
    set_latency(backend, latency_ms=10)
    [next_job] = submit(api, 1)
    # Hard deadline = timeout_s + the stuck grace; then the watcher writes the job off.
    job = wait_until(
        "the stuck job failed", lambda: Job.objects.filter(pk=stuck, state=JobState.FAILED).first(), 20, worker
    )
    assert "timed out after 1s" in job.error and "abandoned" in job.error
    wait_until("the next job ran", lambda: states([next_job]) == ["succeeded"], 15, worker)
    assert worker.poll() is None  # the worker lives on


SUBMIT = """
import django, json, sys
django.setup()
from django.contrib.auth.models import User
from django.test import Client
c = Client()
c.force_login(User.objects.get(username=sys.argv[1]))
ids = [c.post("/jobs", data={"prompt": f"job {i}"}, content_type="application/json").json()["id"]
       for i in range(int(sys.argv[2]))]
print(json.dumps(ids))
"""


def test_redis_restart_with_jobs_running_and_queued_loses_nothing(user, backend, private_redis, worker_process):
    """Everything in Redis is lost (kill -9, no persistence): each job still ends once, within 30 s."""
    set_latency(backend, latency_ms=2500)
    env = {"REDIS_URL": private_redis.url, **FAST}
    proc = subprocess.run(
        [sys.executable, "-c", SUBMIT, user.username, "6"],
        cwd=ROOT,
        env=process_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    ids = json.loads(proc.stdout.strip().splitlines()[-1])
    worker = worker_process(MAX_CONCURRENCY="2", **env)
    wait_until("two running", lambda: states(ids).count("running") == 2, 30, worker)
    running = [i for i in ids if Job.objects.get(pk=i).state == JobState.RUNNING]
    private_redis.restart()
    restarted = time.monotonic()
    wait_until("all succeeded", lambda: set(states(ids)) == {"succeeded"}, 30, worker)
    assert time.monotonic() - restarted < 30
    jobs = Job.objects.filter(pk__in=ids)
    # The running ones were not stolen from their live worker; the queued ones ran once, from the DB.
    assert {j.attempt_count for j in jobs} == {1}, [(j.pk, j.attempt_count) for j in jobs]
    assert all(Job.objects.get(pk=i).attempts.get().outcome == AttemptOutcome.SUCCEEDED for i in running)
    assert worker.poll() is None


def test_a_second_sigterm_requeues_the_running_jobs_at_once_and_exits(api, backend, worker_process):
    """Cold stop: the operator will not wait out the grace. The jobs go back on their queue now
    (attempt ``interrupted``), not when the grace or the 60 s calls end."""
    set_latency(backend, latency_ms=60_000)
    ids = submit(api, 2)
    worker = worker_process(MAX_CONCURRENCY="4", WORKER_SHUTDOWN_GRACE_MS="120000", **FAST)
    wait_until("both running", lambda: states(ids) == ["running"] * 2, 30, worker)
    name = Job.objects.get(pk=ids[0]).worker
    worker.send_signal(signal.SIGTERM)
    # The first signal was taken (RQ notes when on its worker key): the worker now waits out the grace.
    wait_until(
        "the first signal was taken",
        lambda: redis_client().hexists(f"rq:worker:{name}", "shutdown_requested_date"),
        30,
        worker,
    )
    # RQ ignores a repeat within a second of the first (a worker pool's duplicate): repeat until it exits.
    second = time.monotonic()
    while worker.poll() is None:
        assert time.monotonic() - second < 30, f"still running after a second SIGTERM:\n{worker.log_path.read_text()}"
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    assert worker.returncode == 0, worker.log_path.read_text()[-4000:]
    for job in Job.objects.filter(pk__in=ids):
        assert (job.state, job.worker, job.output) == (JobState.QUEUED, "", "")
        attempt = job.attempts.get()
        assert attempt.outcome == AttemptOutcome.INTERRUPTED and "second signal" in attempt.error
    assert {j.encode() for j in ids} <= set(
        [i.encode() for i in fair_queue.waiting_ids("normal")]
    )  # no reconciler needed
    set_latency(backend, latency_ms=10)
    run_worker_burst()
    assert states(ids) == ["succeeded"] * 2
    assert [Job.objects.get(pk=i).attempt_count for i in ids] == [2, 2]
