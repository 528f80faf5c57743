"""Job ends become deliveries: to whom, in how many queries, and at what cost when nobody listens."""

from __future__ import annotations

import json
import time

import pytest

from jobs.models import Job, JobState
from tenants.models import Membership, Tenant
from webhooks import events, services, subscribers
from webhooks.models import WebhookDelivery

pytestmark = pytest.mark.django_db(transaction=True)
URL = "https://93.184.215.14/hooks"
ALL_JOB_EVENTS = ["job.succeeded", "job.failed", "job.canceled", "job.expired"]


@pytest.fixture(autouse=True)
def fresh_subscribers(settings):
    settings.WEBHOOK_ENDPOINTS_CACHE_S = 1.0
    subscribers.forget()
    yield
    subscribers.forget()


def new_job(user, tenant=None, **fields) -> Job:
    name = tenant.name if tenant else ""
    return Job.objects.create(prompt="p", timeout_s=60, created_by=user, tenant=tenant, tenant_name=name, **fields)


def test_a_canceled_job_owes_its_owners_endpoint_a_job_canceled_delivery(user, django_user_model):
    services.create(owner=user, url=URL, events=ALL_JOB_EVENTS, source="shell")
    other = django_user_model.objects.create_user("bob")
    services.create(owner=other, url=URL, events=ALL_JOB_EVENTS, source="shell")  # not bob's job
    services.create(owner=user, url=URL, events=["job.succeeded"], source="shell")  # not this event
    job = new_job(user)
    assert job.cancel()
    (delivery,) = WebhookDelivery.objects.all()
    body = json.loads(delivery.payload)
    assert delivery.event_type == body["type"] == "job.canceled"
    assert body["data"]["id"] == str(job.pk) and body["data"]["state"] == "canceled"
    assert delivery.endpoint.owner == user and delivery.state == "pending"


def test_a_tenant_endpoint_gets_every_members_jobs_and_a_members_own_endpoint_only_theirs(user, django_user_model):
    tenant = Tenant.objects.create(name="acme")
    bob = django_user_model.objects.create_user("bob")
    Membership.objects.create(user=user, tenant=tenant)
    Membership.objects.create(user=bob, tenant=tenant)
    tenant_hook = services.create(owner=user, tenant=tenant, url=URL, events=ALL_JOB_EVENTS, source="shell")
    bobs_hook = services.create(owner=bob, url=URL, events=ALL_JOB_EVENTS, source="shell")
    new_job(user, tenant).cancel()
    new_job(bob, tenant).cancel()
    got = sorted((d.endpoint_id, json.loads(d.payload)["data"]["tenant"]) for d in WebhookDelivery.objects.all())
    assert got == sorted([(tenant_hook.pk, "acme"), (tenant_hook.pk, "acme"), (bobs_hook.pk, "acme")])


def test_many_jobs_ending_together_cost_one_query_for_endpoints_and_one_insert(
    user, django_assert_num_queries, settings
):
    services.create(owner=user, url=URL, events=ALL_JOB_EVENTS, source="shell")
    services.create(owner=user, url=URL, events=["job.failed"], source="shell")
    jobs = [new_job(user, state=JobState.FAILED, error="x") for _ in range(20)]
    for job in jobs:
        job._known_attempts = []  # as the worker's path holds them: the payload needs no query
    subscribers.current()  # warm
    with django_assert_num_queries(4):  # savepoint, endpoints, insert, release
        events.jobs_ended(jobs)
    assert WebhookDelivery.objects.count() == 40


def test_with_no_endpoints_a_jobs_end_costs_no_query_and_no_redis(
    user, django_assert_num_queries, redis_db, monkeypatch
):
    jobs = [new_job(user, state=JobState.SUCCEEDED) for _ in range(100)]
    subscribers.current()  # warm: one query and one GET per WEBHOOK_ENDPOINTS_CACHE_S
    commands: list[str] = []
    real = type(redis_db).execute_command
    monkeypatch.setattr(
        type(redis_db), "execute_command", lambda self, *a, **k: commands.append(a[0]) or real(self, *a, **k)
    )
    with django_assert_num_queries(0):
        started = time.perf_counter()
        for _ in range(100):
            events.jobs_ended(jobs)
        per_job_us = (time.perf_counter() - started) / (100 * len(jobs)) * 1e6
    assert commands == []
    print(f"jobs_ended without endpoints: {per_job_us:.2f} us per job")
    assert per_job_us < 50  # a dictionary look-up, not I/O
    assert not WebhookDelivery.objects.exists()


def test_another_process_sees_a_new_endpoint_within_the_cache_time(user, settings):
    settings.WEBHOOK_ENDPOINTS_CACHE_S = 0.3
    stale = subscribers.current()  # this "other process" holds an empty list...
    stale_entry = subscribers._cached
    assert not stale.wants("job.failed", user.pk, None)
    services.create(owner=user, url=URL, events=["job.failed"], source="shell")
    subscribers._cached = (time.monotonic(), stale_entry[1], stale_entry[2])  # ...which the save here did not reach
    assert not subscribers.wants("job.failed", user.pk, None)  # trusted for the cache time
    time.sleep(0.35)
    assert subscribers.wants("job.failed", user.pk, None)  # the version moved: reloaded


def test_disabling_or_deleting_an_endpoint_stops_new_deliveries(user):
    endpoint = services.create(owner=user, url=URL, events=ALL_JOB_EVENTS, source="shell")
    endpoint.enabled = False
    endpoint.save()
    new_job(user).cancel()
    assert not WebhookDelivery.objects.exists()
    endpoint.enabled = True
    endpoint.save()
    new_job(user).cancel()
    assert WebhookDelivery.objects.count() == 1
    services.delete(endpoint, source="shell")
    new_job(user).cancel()
    assert not WebhookDelivery.objects.exists()  # deleted with its endpoint; none new


def test_publish_inside_a_transaction_that_rolls_back_leaves_nothing(user):
    from django.db import transaction

    services.create(owner=user, url=URL, events=["batch.failed"], source="shell")
    with pytest.raises(RuntimeError), transaction.atomic():
        assert events.publish("batch.failed", {"id": "b"}, owner_id=user.pk, tenant_id=None) == 1
        raise RuntimeError("the batch's outcome did not commit")
    assert not WebhookDelivery.objects.exists()


def new_batch(user, tenant=None):
    from datetime import timedelta

    from django.utils import timezone

    from batches.models import Batch, File, FilePurpose

    file = File.objects.create(purpose=FilePurpose.BATCH, filename="in.jsonl", bytes=3, blob="x", created_by=user)
    return Batch.objects.create(
        input_file=file, created_by=user, tenant=tenant, expires_at=timezone.now() + timedelta(hours=1)
    )


@pytest.mark.parametrize("final", ["completed", "failed", "expired", "cancelled"])
def test_a_batch_reaching_a_final_status_owes_batch_status_with_the_batch_object(user, final):
    from batches.models import BatchStatus

    services.create(owner=user, url=URL, events=[f"batch.{final}", *ALL_JOB_EVENTS], source="shell")
    batch = new_batch(user)
    path = {"completed": ["in_progress", "finalizing"], "failed": [], "expired": ["in_progress", "finalizing"]}
    for step in [*path.get(final, ["in_progress", "cancelling"]), final]:
        assert batch.transition(BatchStatus(step)), step
    (delivery,) = WebhookDelivery.objects.all()
    body = json.loads(delivery.payload)
    assert delivery.event_type == body["type"] == f"batch.{final}"
    assert body["data"]["id"] == batch.pk and body["data"]["object"] == "batch" and body["data"]["status"] == final


def test_a_batch_line_ending_owes_no_job_event(user):
    services.create(owner=user, url=URL, events=ALL_JOB_EVENTS, source="shell")
    line = new_job(user, batch=new_batch(user), custom_id="r1")
    assert line.cancel()
    assert not WebhookDelivery.objects.exists()  # its batch says it, once, for all its lines
