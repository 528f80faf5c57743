"""Fair share through a real worker process: a tenant's backlog does not hold back another tenant's
new jobs, and backlogged tenants share dispatches by weight."""

from __future__ import annotations

import pytest
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from jobs import fair_queue, queueing
from jobs.models import Job, JobState
from tenants.models import Tenant
from tests.conftest import run_worker_burst
from tests.factories import make_job
from workers.runtime.base import FairDequeue

pytestmark = pytest.mark.django_db(transaction=True)


def backlog(backend, tenant: Tenant, n: int) -> list[str]:
    ids = []
    for i in range(n):
        job = make_job(backend, tenant=tenant, prompt=f"{tenant.name} {i}")
        queueing.enqueue(job)
        ids.append(str(job.pk))
    return ids


def start_order(ids: list[str]) -> list[str]:
    """Jobs by the order their runs started (the claim time, then the attempt's own)."""
    rows = Job.objects.filter(pk__in=ids).order_by("started_at", "attempts__started_at")
    return list(dict.fromkeys(str(pk) for pk in rows.values_list("pk", flat=True)))


def drop_rq_hashes(rq_job_ids: list[str]) -> None:
    """Delete RQ job hashes behind the fair queue's back (as an operator's cleanup or an expired key would)."""
    fair_queue.redis_client().delete(*(f"rq:job:{i}" for i in rq_job_ids))


def test_a_burst_dequeue_takes_past_entries_whose_rq_hash_is_gone(dev_backend):
    gone = [make_job(dev_backend, prompt=f"gone {i}") for i in range(3)]
    kept = make_job(dev_backend, prompt="kept")
    for job in [*gone, kept]:
        queueing.enqueue(job)
    drop_rq_hashes([j.rq_job_id for j in gone])
    queue = queueing.get_queue("normal")
    taken = FairDequeue.dequeue_any([queue], None, fair_queue.redis_client(), RQJob, JSONSerializer)
    assert taken is not None and taken[0].id == kept.rq_job_id
    assert FairDequeue.dequeue_any([queue], None, fair_queue.redis_client(), RQJob, JSONSerializer) is None


@pytest.mark.slow
def test_a_burst_worker_drains_the_queue_past_entries_whose_rq_hash_is_gone(dev_backend):
    jobs = [make_job(dev_backend, prompt=f"job {i}") for i in range(6)]
    for job in jobs:
        queueing.enqueue(job)
    drop_rq_hashes([jobs[0].rq_job_id, jobs[1].rq_job_id])  # the first takes find nothing to run
    run_worker_burst(MAX_CONCURRENCY="1")
    states = {str(j.pk): j.state for j in Job.objects.filter(pk__in=[j.pk for j in jobs[2:]])}
    assert set(states.values()) == {JobState.SUCCEEDED}, states
    assert fair_queue.depths(["normal"]) == {"normal": 0}


@pytest.mark.slow
def test_a_new_tenants_jobs_start_before_the_backlog_of_another(dev_backend):
    dev_backend.config = {"latency_ms": 5}
    dev_backend.save()
    a = backlog(dev_backend, Tenant.objects.create(name="a"), 200)
    b = backlog(dev_backend, Tenant.objects.create(name="b"), 10)
    run_worker_burst(MAX_CONCURRENCY="4")
    order = start_order(a + b)
    assert len(order) == 210
    last_b = max(order.index(j) for j in b)
    assert last_b < order.index(a[49]), order.index(a[49])


@pytest.mark.slow
def test_backlogged_tenants_share_dispatches_by_weight(dev_backend):
    heavy = backlog(dev_backend, Tenant.objects.create(name="heavy", weight=3), 150)
    light = backlog(dev_backend, Tenant.objects.create(name="light", weight=1), 150)
    run_worker_burst(MAX_CONCURRENCY="4")
    first = start_order(heavy + light)[:100]
    share = sum(1 for j in first if j in set(heavy)) / len(first)
    assert 0.70 <= share <= 0.80, share
