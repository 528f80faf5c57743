"""Admission on ``POST /jobs``: each counted limit is a 429 with ``Retry-After`` and a body naming it,
each tenant rule a 403, and no refusal leaves anything behind (no row, no queue entry, no
Idempotency-Key): the same key with an allowed request then gets its 202."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings as django_settings
from django.test import override_settings
from django.utils import timezone

from jobs import fair_queue
from jobs.models import Job, JobState
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tenants import admission, identity
from tenants.models import Membership, Tenant
from tests.factories import make_job

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def tenant(user) -> Tenant:
    t = Tenant.objects.create(name="acme")
    Membership.objects.create(user=user, tenant=t)
    return t


def set_limits(tenant: Tenant, **limits) -> None:
    for name, value in limits.items():
        setattr(tenant, name, value)
    tenant.save()
    identity.forget()  # the API reads the saved tenant at once


def post(api, key: str | None = None, **body):
    headers = {"Idempotency-Key": key} if key else {}
    return api.post("/jobs", {"prompt": "hello", **body}, format="json", headers=headers)


def left_behind(redis) -> dict:
    """What a request could have left: rows, waiting jobs, idempotency keys."""
    return {
        "rows": Job.objects.count(),
        "waiting": sum(fair_queue.depths(django_settings.JOB_QUEUES).values()),
        "keys": sorted(redis.scan_iter("llmo:idem:*")),
    }


def assert_refused(response, limit: str, *, status: int = 429) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["limit"] == limit and body["detail"]
    if status == 429:
        assert int(response["Retry-After"]) == body["retry_after"] >= 1
    return body


# --- 429s ------------------------------------------------------------------------------------------
def test_over_rpm_limit_is_429_until_the_oldest_submission_leaves_the_minute(api, policy, tenant, redis_db):
    set_limits(tenant, rpm_limit=2)
    assert post(api).status_code == 202 and post(api).status_code == 202
    before = left_behind(redis_db)
    body = assert_refused(post(api, key="k-rpm"), "rpm_limit")
    assert 55 <= body["retry_after"] <= 60
    assert "rpm_limit" in body["detail"] and "acme" in body["detail"]
    assert left_behind(redis_db) == before
    set_limits(tenant, rpm_limit=3)
    assert post(api, key="k-rpm").status_code == 202  # the refused key was never claimed


def test_over_tokens_per_day_counts_the_max_tokens_reservation(api, policy, tenant, redis_db):
    set_limits(tenant, tokens_per_day=100)
    first = post(api, max_tokens=60)
    assert first.status_code == 202
    assert Job.objects.get(pk=first.json()["id"]).reserved_tokens == 60
    before = left_behind(redis_db)
    body = assert_refused(post(api, key="k-tok", max_tokens=60), "tokens_per_day")
    midnight = (timezone.now() + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert abs(body["retry_after"] - (midnight - timezone.now()).total_seconds()) < 5
    assert "60 of 100" in body["detail"]
    assert left_behind(redis_db) == before
    assert post(api, key="k-tok", max_tokens=40).status_code == 202  # the same key, a body that fits


@override_settings(TOKEN_RESERVATION_DEFAULT=70)
def test_a_job_without_max_tokens_reserves_the_default(api, policy, tenant):
    set_limits(tenant, tokens_per_day=100)
    assert post(api).status_code == 202
    assert_refused(post(api), "tokens_per_day")


def test_over_budget_is_429_until_the_period_ends(api, policy, tenant, dev_backend, redis_db):
    set_limits(tenant, budget_usd=Decimal("1.50"), budget_period="day")
    make_job(dev_backend, tenant=tenant, state=JobState.SUCCEEDED, cost=Decimal("1.5"))  # spent today (rebuilt)
    before = left_behind(redis_db)
    body = assert_refused(post(api, key="k-usd"), "budget_usd")
    assert "$1.5000 of $1.5000" in body["detail"]
    assert body["retry_after"] <= 24 * 3600
    assert left_behind(redis_db) == before
    set_limits(tenant, budget_usd=Decimal("2"))
    assert post(api, key="k-usd").status_code == 202


def test_over_max_queued_is_429(api, policy, tenant, redis_db):
    set_limits(tenant, max_queued=2)
    assert post(api).status_code == 202 and post(api).status_code == 202
    before = left_behind(redis_db)
    body = assert_refused(post(api, key="k-q"), "max_queued")
    assert body["retry_after"] == admission.UNKNOWN_DRAIN_RETRY_S  # nothing drained yet
    assert left_behind(redis_db) == before
    set_limits(tenant, max_queued=None)
    assert post(api, key="k-q").status_code == 202


@override_settings(QUEUE_MAX_DEPTH=2)
def test_queue_max_depth_is_per_priority_with_retry_after_from_the_drain_rate(api, user, policy, redis_db):
    assert post(api).status_code == 202 and post(api).status_code == 202  # a user in no tenant counts too
    # 30 jobs taken from `normal` over the last minute: 0.5 jobs/s; one over the cap -> 2 s.
    redis_db.set(fair_queue.drain_keys("normal")[-1], 30)
    before = left_behind(redis_db)
    body = assert_refused(post(api, key="k-d"), "queue_max_depth")
    assert body["retry_after"] == 2
    assert left_behind(redis_db) == before
    assert post(api, priority="high").status_code == 202  # another priority has room
    fair_queue.take(["normal"])  # a worker takes one
    assert post(api, key="k-d").status_code == 202


@override_settings(QUEUE_MAX_DEPTH=3)
def test_waiting_batch_lines_count_toward_neither_max_queued_nor_the_queue_depth(api, policy, tenant, redis_db):
    set_limits(tenant, max_queued=2)
    key = fair_queue.tenant_key(tenant.pk)
    for i in range(10):  # a batch's lines waiting at `normal` (as batches.window pushes them)
        fair_queue.push("normal", key, f"line-{i}", str(i), batch=True)
    assert int(redis_db.get(fair_queue.tenant_queued_key(key))) == 10  # still waiting jobs for the gauges
    assert post(api).status_code == 202 and post(api).status_code == 202
    assert_refused(post(api, key="k-q"), "max_queued")  # the tenant's own two count
    set_limits(tenant, max_queued=None)
    assert post(api).status_code == 202  # three interactive jobs at `normal`: the depth's cap
    assert_refused(post(api, key="k-d"), "queue_max_depth")
    # a worker takes the oldest: four batch lines; their count goes down with them, the interactive jobs' not
    taken = fair_queue.take(["normal"], 4)
    assert [t.job_id for t in taken] == [f"line-{i}" for i in range(4)] and {t.batch for t in taken} == {"1"}
    assert int(redis_db.get(fair_queue.tenant_batched_key(key))) == 6
    assert_refused(post(api, key="k-d"), "queue_max_depth")  # still three interactive jobs waiting
    fair_queue.put_back(taken)  # back where they were, counted as what they are
    assert int(redis_db.get(fair_queue.tenant_batched_key(key))) == 10
    assert int(redis_db.get(fair_queue.batch_depth_key("normal"))) == 10
    assert_refused(post(api, key="k-d"), "queue_max_depth")
    fair_queue.remove("normal", key, "line-0")  # a cancelled line leaves its count too
    assert int(redis_db.get(fair_queue.tenant_batched_key(key))) == 9


def test_a_replay_is_never_refused(api, policy, tenant):
    set_limits(tenant, rpm_limit=1)
    first = post(api, key="same")
    again = post(api, key="same")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]


def test_no_limits_keeps_the_old_round_trip(api, policy, tenant, redis_db):
    assert not admission.has_limits(tenant)
    assert post(api, key="plain").status_code == 202
    assert not list(redis_db.scan_iter("llmo:adm:*"))


# --- 403s ------------------------------------------------------------------------------------------
def test_a_disabled_tenant_is_403(api, policy, tenant, redis_db):
    set_limits(tenant, enabled=False)
    assert_refused(post(api, key="k"), "enabled", status=403)
    assert left_behind(redis_db) == {"rows": 0, "waiting": 0, "keys": []}


def test_a_priority_above_the_cap_is_403_naming_it(api, policy, tenant, redis_db):
    set_limits(tenant, max_priority="normal")
    body = assert_refused(post(api, key="k", priority="high"), "max_priority", status=403)
    assert "'normal'" in body["detail"]
    assert left_behind(redis_db) == {"rows": 0, "waiting": 0, "keys": []}
    assert post(api, key="k", priority="normal").status_code == 202
    assert post(api, priority="low").status_code == 202


@pytest.fixture
def two_backends(db, dev_backend) -> Backend:
    other = Backend.objects.create(name="other", kind=BackendKind.DEV, model="m-x", config={"latency_ms": 0})
    p = RoutingPolicy.objects.create(name="both", strategy="ordered", params={"order": ["dev", "other"]})
    policies.activate(p)
    return other


def test_a_pinned_backend_outside_allowed_backends_is_403(api, tenant, two_backends, redis_db):
    set_limits(tenant, allowed_backends=["other"], rpm_limit=5)
    body = assert_refused(post(api, key="k", backend="dev"), "allowed_backends", status=403)
    assert "'dev'" in body["detail"]
    assert left_behind(redis_db) == {"rows": 0, "waiting": 0, "keys": []}
    assert post(api, key="k", backend="other").status_code == 202


def test_a_model_served_only_outside_allowed_backends_is_403_and_leaves_nothing(api, tenant, two_backends, redis_db):
    set_limits(tenant, allowed_backends=["dev"], rpm_limit=1, tokens_per_day=5000)
    two_backends.model = "m-x"
    Backend.objects.filter(pk=two_backends.pk).update(model="m-x")
    Backend.objects.filter(name="dev").update(model="m-dev")
    policies.activate(RoutingPolicy.objects.get(name="both"))  # a new registry version
    body = assert_refused(post(api, key="k", model="m-x"), "allowed_backends", status=403)
    assert "other" in body["detail"]
    assert left_behind(redis_db) == {"rows": 0, "waiting": 0, "keys": []}
    # the admission was given back: the one submission a minute and the tokens are still there
    assert redis_db.zcard(f"{admission.PREFIX}t:{tenant.pk}:rpm") == 0
    assert int(redis_db.get(admission.tokens_key(tenant.pk, timezone.now()))) == 0
    assert post(api, key="k", model="m-dev").status_code == 202


def test_routing_never_picks_a_backend_outside_allowed_backends(api, tenant, two_backends):
    set_limits(tenant, allowed_backends=["other"])
    ids = [post(api).json()["id"] for _ in range(3)]  # the policy prefers dev
    assert set(Job.objects.filter(pk__in=ids).values_list("backend_name", flat=True)) == {"other"}
    job = Job.objects.get(pk=ids[0])
    assert job.routing["rejected"]["dev"] == "not among the tenant's allowed backends"


def test_a_user_in_no_tenant_is_not_limited(api, policy):
    assert all(post(api, priority="high").status_code == 202 for _ in range(3))


# --- the job's tenant and queue timeout ------------------------------------------------------------
def test_the_job_records_its_tenant_and_queue_timeout(api, policy, tenant):
    set_limits(tenant, queue_timeout_s=90, weight=3)
    r = post(api)
    doc = r.json()
    job = Job.objects.get(pk=doc["id"])
    assert job.tenant_id == tenant.pk and job.tenant_name == "acme"
    assert doc["tenant"] == "acme" and "tenant_id" not in doc
    assert doc["queue_timeout_s"] == 90 and job.expires_at == job.created_at + timedelta(seconds=90)
    assert doc["expires_at"] is not None
    assert api.get(f"/jobs/{doc['id']}").json()["tenant"] == "acme"
    assert fair_queue.redis_client().hget(f"{fair_queue.PREFIX}weights", str(tenant.pk)) == b"3"
    own = post(api, queue_timeout_s=5).json()
    assert own["queue_timeout_s"] == 5


@override_settings(MAX_QUEUE_TIMEOUT_S=60)
def test_queue_timeout_is_validated(api, policy):
    assert post(api, queue_timeout_s=61).status_code == 400
    assert post(api, queue_timeout_s=0).status_code == 400
    doc = post(api).json()
    assert doc["tenant"] is None and doc["queue_timeout_s"] is None and doc["expires_at"] is None
