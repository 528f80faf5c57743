"""Webhooks through real `manage.py rqworker` processes: jobs end in every final state and the
receiver gets each event signed, after a retry, once; a worker killed with SIGKILL mid-send loses
no delivery."""

from __future__ import annotations

import os
import signal
import time

import pytest

from jobs.models import Job, JobState
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.fakes.webhook_receiver import WebhookReceiver
from webhooks import events, subscribers
from webhooks.models import WebhookDelivery

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

WORKER_ENV = {
    "WEBHOOK_ALLOW_PRIVATE": "1",
    "WEBHOOK_RETRY_BASE_MS": "200",
    "WEBHOOK_RETRY_MAX_MS": "1000",
    "WEBHOOK_POLL_MS": "200",
}


@pytest.fixture(autouse=True)
def allow_loopback(settings):
    subscribers.forget()
    settings.WEBHOOK_ALLOW_PRIVATE = True
    yield
    subscribers.forget()


@pytest.fixture
def backends(db) -> None:
    Backend.objects.create(name="dev", kind=BackendKind.DEV, config={"latency_ms": 0})
    Backend.objects.create(name="broken", kind=BackendKind.DEV, config={"fail_rate": 1.0, "fail_status": 400})
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["dev"]}))


def settled(count: int, timeout: float = 15) -> list[WebhookDelivery]:
    """The deliveries once none is pending (the receiver has a request before its sender logs it)."""
    deadline = time.monotonic() + timeout
    while WebhookDelivery.objects.filter(state="pending").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    rows = list(WebhookDelivery.objects.all())
    assert len(rows) == count and all(d.state != "pending" for d in rows), [(d.state, d.attempts) for d in rows]
    return rows


def submit(api, **body) -> str:
    r = api.post("/jobs", {"prompt": "hello hooks", **body}, format="json")
    assert r.status_code == 202, r.content
    return r.json()["id"]


def test_jobs_ending_in_each_final_state_reach_the_receiver_signed_once_each(api, backends, worker_process):
    with WebhookReceiver(statuses=[500, 200]) as receiver:
        r = api.post(
            "/webhooks",
            {"url": receiver.url, "events": ["job.succeeded", "job.failed", "job.canceled", "job.expired"]},
            format="json",
        )
        assert r.status_code == 201, r.content
        receiver.secret = r.json()["secret"]
        canceled = submit(api)
        assert api.post(f"/jobs/{canceled}/cancel").status_code == 200  # in this (web) process
        expired = submit(api, queue_timeout_s=1)
        succeeded = submit(api)
        failed = submit(api, backend="broken")
        time.sleep(1.2)  # the expiring job's queue timeout passes before any worker runs
        worker = worker_process(**WORKER_ENV)
        requests = receiver.wait_for(4, timeout=90, accepted=True)
        assert worker.poll() is None, worker.log_path.read_text()
    by_job = {event["data"]["id"]: event for event in receiver.accepted.values()}
    assert {job_id: event["type"] for job_id, event in by_job.items()} == {
        succeeded: "job.succeeded",
        failed: "job.failed",
        canceled: "job.canceled",
        expired: "job.expired",
    }
    assert all(r.signature_ok for r in requests), [r.why for r in requests]
    first, retry = requests[0], next(r for r in requests[1:] if r.webhook_id == requests[0].webhook_id)
    assert first.body == retry.body  # the 500 was retried: same webhook-id, same bytes
    for job_id, event in by_job.items():
        job = Job.objects.get(pk=job_id)
        assert event["data"]["state"] == job.state and "owner_id" not in event["data"]
    assert by_job[succeeded]["data"]["output"] == "hello hooks"
    assert "HTTP 400" in by_job[failed]["data"]["error"]
    assert Job.objects.get(pk=expired).state == JobState.EXPIRED
    deliveries = settled(4)
    assert {d.state for d in deliveries} == {"succeeded"}
    assert sum(d.attempts for d in deliveries) == 5
    assert {a.worker.rsplit(".", 1)[-1] for d in deliveries for a in d.attempt_log.all()} == {str(worker.pid)}


def test_a_worker_killed_mid_send_leaves_the_delivery_to_another_with_the_same_webhook_id(user, worker_process):
    from webhooks import services

    env = {**WORKER_ENV, "WEBHOOK_TIMEOUT_MS": "2000"}  # a claim's lease: 2 x 2 s + 5 s
    with WebhookReceiver(hold_s=2.0, hold_first=1) as receiver:
        endpoint = services.create(owner=user, url=receiver.url, events=["batch.completed"], source="shell")
        receiver.secret = endpoint.secret
        first = worker_process(**env)
        time.sleep(0.5)
        assert events.publish("batch.completed", {"id": "batch_9"}, owner_id=user.pk, tenant_id=None) == 1
        receiver.wait_for(1, timeout=30)  # the request is in flight, held by the receiver
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        killed_at = time.monotonic()
        second = worker_process(**env)
        requests = receiver.wait_for(2, timeout=60)
        took = time.monotonic() - killed_at
    assert requests[0].webhook_id == requests[1].webhook_id and requests[0].body == requests[1].body
    assert all(r.signature_ok for r in requests)
    (delivery,) = settled(1)
    assert delivery.state == "succeeded"
    (attempt,) = delivery.attempt_log.all()  # the killed worker's attempt never came back to be logged
    assert attempt.succeeded and attempt.worker.endswith(f".{second.pid}")
    assert took < 30, took  # within the lease (9 s) and a poll, plus a worker's start
