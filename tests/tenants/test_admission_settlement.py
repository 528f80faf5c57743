"""Settlement: a job's reservation gives way to its real usage exactly once, whichever way it ends
(succeeded, failed, canceled, expired; by a real worker too); an operator's retry reserves again;
counters lost with Redis are rebuilt from the rows; racing submissions never over-admit."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from jobs.models import Job, JobState
from orchestrator_site.redis import RoundTrip
from tenants import admission, identity
from tenants.models import Membership, Tenant
from tests.conftest import run_worker_burst

pytestmark = pytest.mark.django_db(transaction=True)

RESULT = {"output": "ok", "finish_reason": "stop", "latency_ms": 3}


@pytest.fixture
def tenant(user) -> Tenant:
    t = Tenant.objects.create(name="acme", tokens_per_day=10_000, budget_usd=Decimal("100"), budget_period="month")
    Membership.objects.create(user=user, tenant=t)
    return t


def submit(api, **body) -> Job:
    r = api.post("/jobs", {"prompt": "hello", "max_tokens": 100, **body}, format="json")
    assert r.status_code == 202, r.content
    return Job.objects.get(pk=r.json()["id"])


def tokens(redis, tenant) -> int:
    return int(redis.get(admission.tokens_key(tenant.pk, timezone.now())) or 0)


def spend(redis, tenant) -> int:
    return int(redis.get(admission.spend_key(tenant.pk, "month", timezone.now())) or 0)


def test_success_settles_the_reservation_to_the_real_usage_once(api, policy, tenant, redis_db):
    job = submit(api)
    assert tokens(redis_db, tenant) == 100 and spend(redis_db, tenant) == 0
    assert job.mark_running("w1")
    assert job.mark_succeeded(**RESULT, prompt_tokens=7, completion_tokens=5, cost=Decimal("0.25"))
    assert tokens(redis_db, tenant) == 12
    assert spend(redis_db, tenant) == 250_000
    stale = Job.objects.get(pk=job.pk)
    stale.state, stale.version = JobState.RUNNING, job.version - 1
    assert not stale.mark_succeeded(**RESULT, prompt_tokens=7, completion_tokens=5, cost=Decimal("0.25"))
    assert not Job.objects.get(pk=job.pk).cancel()
    assert tokens(redis_db, tenant) == 12 and spend(redis_db, tenant) == 250_000  # the losers settle nothing


def test_failure_cancel_and_expiry_release_the_reservation_once(api, policy, tenant, redis_db):
    failed, canceled, expired = submit(api), submit(api), submit(api, queue_timeout_s=1)
    assert tokens(redis_db, tenant) == 300
    assert failed.mark_running("w1") and failed.mark_failed("backend down")
    assert tokens(redis_db, tenant) == 200
    assert canceled.cancel()
    assert not Job.objects.get(pk=canceled.pk).cancel()
    assert tokens(redis_db, tenant) == 100
    Job.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert [j.pk for j in Job.expire_due()] == [expired.pk]
    assert Job.expire_due() == []
    assert tokens(redis_db, tenant) == 0


def test_an_operator_retry_reserves_again(api, policy, tenant, redis_db):
    job = submit(api)
    assert job.cancel()
    assert tokens(redis_db, tenant) == 0
    assert job.requeue()
    assert tokens(redis_db, tenant) == 100
    assert job.cancel()
    assert tokens(redis_db, tenant) == 0


def test_jobs_run_by_a_real_worker_settle_their_usage(api, policy, tenant, redis_db):
    jobs = [submit(api) for _ in range(3)]
    assert tokens(redis_db, tenant) == 300
    run_worker_burst("high", "normal", "low")
    used = 0
    for job in jobs:
        job.refresh_from_db()
        assert job.state == JobState.SUCCEEDED
        used += (job.prompt_tokens or 0) + (job.completion_tokens or 0)
    assert used > 0
    assert tokens(redis_db, tenant) == used == admission.tokens_from_rows(tenant.pk, timezone.now())


def test_counters_lost_with_redis_are_rebuilt_from_the_rows(api, policy, tenant, redis_db):
    done, waiting = submit(api), submit(api)
    assert done.mark_running("w1")
    assert done.mark_succeeded(**RESULT, prompt_tokens=30, completion_tokens=20, cost=Decimal("99.5"))
    redis_db.flushdb()  # Redis restarted empty
    tenant.tokens_per_day = 200
    tenant.save()
    identity.forget()
    # 50 used + 100 reserved by the waiting job: another 100 does not fit, 50 does
    refused = api.post("/jobs", {"prompt": "x", "max_tokens": 100}, format="json")
    assert refused.status_code == 429 and refused.json()["limit"] == "tokens_per_day"
    assert tokens(redis_db, tenant) == 150
    assert spend(redis_db, tenant) == 99_500_000
    assert submit(api, max_tokens=50)
    assert tokens(redis_db, tenant) == 200
    assert waiting.cancel()
    assert tokens(redis_db, tenant) == 100


def test_a_settlement_while_the_counter_is_missing_is_left_to_the_rebuild(api, policy, tenant, redis_db):
    job = submit(api)
    redis_db.delete(admission.tokens_key(tenant.pk, timezone.now()))
    assert job.mark_running("w1")
    assert job.mark_succeeded(**RESULT, prompt_tokens=3, completion_tokens=4, cost=None)
    assert redis_db.get(admission.tokens_key(tenant.pk, timezone.now())) is None  # not created half-counted
    submit(api)
    assert tokens(redis_db, tenant) == 7 + 100


# --- races: the script is the one place a decision is made ----------------------------------------
def race(ticket_for, n: int) -> list[str]:
    """``n`` threads run the admission script at once; the outcomes."""
    barrier = threading.Barrier(n)
    outcomes: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        ticket = ticket_for()
        barrier.wait()
        rt = RoundTrip()
        ticket.queue_on(rt)
        rt.execute()
        try:
            result = ticket.outcome()
        except admission.AdmissionRefused as exc:
            result = exc.limit
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


@pytest.mark.parametrize(("limits", "refused_as"), [({"rpm_limit": 7}, "rpm_limit"), ({"max_queued": 7}, "max_queued")])
def test_racing_submissions_never_over_admit(db, limits, refused_as):
    t = Tenant.objects.create(name="racer", **limits)
    outcomes = race(lambda: admission.ticket(t, {"priority": "normal"}, str(uuid.uuid4())), 40)
    assert outcomes.count("ok") == 7
    assert outcomes.count(refused_as) == 33


def test_racing_submissions_never_over_admit_tokens_or_depth(db, settings):
    settings.QUEUE_MAX_DEPTH = 5
    t = Tenant.objects.create(name="racer", tokens_per_day=1000)
    admission.rebuild_tokens(t.pk, timezone.now())
    outcomes = race(lambda: admission.ticket(t, {"max_tokens": 100}, str(uuid.uuid4())), 30)
    assert outcomes.count("ok") == 5 and outcomes.count("queue_max_depth") == 25
    settings.QUEUE_MAX_DEPTH = 0
    outcomes = race(lambda: admission.ticket(t, {"max_tokens": 100}, str(uuid.uuid4())), 30)
    assert outcomes.count("ok") == 5 and outcomes.count("tokens_per_day") == 25  # 500 + 5 x 100 = 1000
    assert django_settings.QUEUE_MAX_DEPTH == 0
