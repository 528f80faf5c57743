"""Many jobs in flight per worker process, priority for free slots, and backend slots across workers."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from jobs.models import Job, JobAttempt, JobState
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import run_worker_burst
from tests.conftest import submit_jobs as submit
from workers.fleet.status import read_workers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def peak_overlap(attempts) -> int:
    """The most attempts that were running at the same moment (a sweep over start/end events)."""
    return _peak([(a.started_at, a.finished_at) for a in attempts])


def peak_calls(attempts) -> int:
    """The most backend calls in flight at once: each call is [finished_at - latency_ms, finished_at].

    An attempt starts at the claim, before its slot is taken; the call's own time (measured by the
    adapter) ends before finished_at, which is written before the slot is given back, so a slot
    handed from one call to the next never shows as an overlap here.
    """
    return _peak([(a.finished_at - timedelta(milliseconds=a.latency_ms), a.finished_at) for a in attempts])


def _peak(intervals) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


@pytest.fixture
def dev(db):
    def make(name: str, latency_ms: int, max_concurrency: int = 64) -> Backend:
        return Backend.objects.create(
            name=name, kind=BackendKind.DEV, config={"latency_ms": latency_ms}, max_concurrency=max_concurrency
        )

    return make


def ordered(*names: str) -> None:
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": list(names)}))


def test_one_worker_process_runs_max_concurrency_jobs_at_once(api, dev):
    dev("slow", latency_ms=600)
    ordered("slow")
    ids = submit(api, 12)
    run_worker_burst(MAX_CONCURRENCY="6")
    jobs = Job.objects.filter(pk__in=ids)
    assert {j.state for j in jobs} == {JobState.SUCCEEDED}
    assert len({j.worker for j in jobs}) == 1  # one process
    assert peak_overlap(JobAttempt.objects.filter(job__in=ids)) == 6  # never more than its slots


def test_a_free_slot_takes_high_before_normal_before_low(api, dev):
    dev("slow", latency_ms=500)
    ordered("slow")
    ids = {p: submit(api, 2, priority=p) for p in ("low", "normal", "high")}
    run_worker_burst(MAX_CONCURRENCY="2")
    started = {p: sorted(Job.objects.get(pk=i).started_at for i in ids[p]) for p in ids}
    assert started["high"][-1] < started["normal"][0]
    assert started["normal"][-1] < started["low"][0]


def test_backend_max_concurrency_holds_across_worker_processes(api, dev, worker_process):
    dev("narrow", latency_ms=400, max_concurrency=3)
    ordered("narrow")
    procs = [worker_process(MAX_CONCURRENCY="4") for _ in range(2)]
    deadline = time.monotonic() + 60
    while len(read_workers()) < 2:  # both up and listening before the jobs arrive
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.1)
    ids = submit(api, 16)
    while Job.objects.filter(pk__in=ids, state=JobState.SUCCEEDED).count() < len(ids):
        assert time.monotonic() < deadline, "jobs did not finish"
        assert all(p.poll() is None for p in procs)
        time.sleep(0.2)
    jobs = Job.objects.filter(pk__in=ids)
    assert len({j.worker for j in jobs}) == 2  # both processes took jobs
    assert peak_calls(JobAttempt.objects.filter(job__in=ids)) == 3  # 8 threads, 3 slots


def test_a_full_backend_passes_the_job_to_the_next_candidate(api, dev):
    dev("narrow", latency_ms=800, max_concurrency=1)
    dev("spare", latency_ms=10)
    ordered("narrow", "spare")
    ids = submit(api, 4)
    run_worker_burst(MAX_CONCURRENCY="4")
    jobs = Job.objects.filter(pk__in=ids)
    assert {j.state for j in jobs} == {JobState.SUCCEEDED}
    by_backend = sorted(j.backend_name for j in jobs)
    assert by_backend.count("narrow") >= 1 and by_backend.count("spare") >= 2
    assert peak_calls(JobAttempt.objects.filter(job__in=ids, backend_name="narrow")) == 1


def test_a_job_waits_for_a_slot_when_every_candidate_is_full(api, dev):
    dev("only", latency_ms=300, max_concurrency=1)
    ordered("only")
    ids = submit(api, 4)
    run_worker_burst(MAX_CONCURRENCY="4")
    jobs = Job.objects.filter(pk__in=ids)
    assert {j.state for j in jobs} == {JobState.SUCCEEDED} and {j.attempt_count for j in jobs} == {1}
    assert peak_calls(JobAttempt.objects.filter(job__in=ids)) == 1
