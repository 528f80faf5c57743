"""Fair share through a real worker process: a tenant's backlog does not hold back another tenant's
new jobs, and backlogged tenants share dispatches by weight."""

from __future__ import annotations

import pytest

from jobs import queueing
from jobs.models import Job
from tenants.models import Tenant
from tests.conftest import run_worker_burst
from tests.factories import make_job

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


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


def test_backlogged_tenants_share_dispatches_by_weight(dev_backend):
    heavy = backlog(dev_backend, Tenant.objects.create(name="heavy", weight=3), 150)
    light = backlog(dev_backend, Tenant.objects.create(name="light", weight=1), 150)
    run_worker_burst(MAX_CONCURRENCY="4")
    first = start_order(heavy + light)[:100]
    share = sum(1 for j in first if j in set(heavy)) / len(first)
    assert 0.70 <= share <= 0.80, share
