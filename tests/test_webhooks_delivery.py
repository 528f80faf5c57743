"""Sending webhooks to a real HTTP receiver: signatures, retries with the same webhook-id, giving up,
no redirects, 410, timeouts and bounded reads, addresses refused at send time, and the metrics.

The sender runs in this process here (``send_due``); tests/test_webhooks_worker.py runs it in real
workers.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from orchestrator_site import metrics
from orchestrator_site.redis import redis_client
from tests.fakes.webhook_receiver import WebhookReceiver
from webhooks import events, sender, services, subscribers
from webhooks.models import DeliveryState, WebhookDelivery, WebhookEndpoint

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def webhook_settings(settings):
    subscribers.forget()
    settings.WEBHOOK_ALLOW_PRIVATE = True
    settings.WEBHOOK_RETRY_BASE_S = 0.05
    settings.WEBHOOK_RETRY_MAX_S = 0.2
    settings.WEBHOOK_TIMEOUT_S = 2.0
    yield settings
    subscribers.forget()


def endpoint_for(receiver: WebhookReceiver, owner, events_=("batch.completed",), **kw) -> WebhookEndpoint:
    endpoint = services.create(owner=owner, url=kw.pop("url", receiver.url), events=list(events_), source="shell", **kw)
    receiver.secret = endpoint.secret
    return endpoint


def send_until_settled(timeout: float = 15.0) -> None:
    """Send what is due until no delivery is pending (retries come due after their short backoff)."""
    deadline = time.monotonic() + timeout
    while WebhookDelivery.objects.filter(state=DeliveryState.PENDING).exists():
        assert time.monotonic() < deadline, list(WebhookDelivery.objects.values())
        sender.send_due()
        time.sleep(0.02)


def counter(outcome: str) -> int:
    field = metrics._field(metrics.WEBHOOK_ATTEMPTS.name, outcome)
    return int(redis_client().hget(metrics.COUNTERS_KEY, field) or 0)


def test_a_published_event_arrives_signed_in_the_standard_shape(user):
    with WebhookReceiver() as receiver:
        endpoint = endpoint_for(receiver, user)
        made = events.publish("batch.completed", {"id": "batch_1", "n": 3}, owner_id=user.pk, tenant_id=None)
        assert made == 1
        assert sender.send_due() == 1
        (got,) = receiver.wait_for(1)
    assert got.signature_ok, got.why
    assert got.path == "/hooks" and got.headers["content-type"] == "application/json"
    event = got.event
    assert event["type"] == "batch.completed" and event["data"] == {"id": "batch_1", "n": 3}
    assert event["timestamp"].endswith("Z") and "T" in event["timestamp"]
    delivery = WebhookDelivery.objects.get()
    assert got.webhook_id == delivery.message_id and got.body == delivery.payload.encode()
    assert (delivery.state, delivery.attempts, delivery.last_status) == ("succeeded", 1, 200)
    (attempt,) = delivery.attempt_log.all()
    assert attempt.succeeded and attempt.status_code == 200 and attempt.latency_ms is not None
    assert delivery.endpoint == endpoint and counter("succeeded") == 1


@pytest.mark.parametrize(
    "event_type",
    ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"],
)
def test_batch_events_go_to_the_tenants_endpoints_subscribed_to_them(user, django_user_model, event_type):
    from tenants.models import Tenant

    tenant = Tenant.objects.create(name="acme")
    service = django_user_model.objects.create_user("tenant:acme")
    with WebhookReceiver() as receiver:
        endpoint_for(receiver, service, events_=[event_type], tenant=tenant)
        endpoint_for(receiver, service, events_=["job.failed"], tenant=tenant)  # not subscribed
        other = Tenant.objects.create(name="other")
        endpoint_for(receiver, service, events_=[event_type], tenant=other)  # another tenant's
        assert events.publish(event_type, {"id": "b"}, owner_id=user.pk, tenant_id=tenant.pk) == 1
        sender.send_due()
        (got,) = receiver.wait_for(1)
    assert got.event["type"] == event_type


def test_unknown_event_types_are_refused():
    with pytest.raises(ValueError, match="Unknown webhook event type"):
        events.publish("batch.done", {}, owner_id=1, tenant_id=None)


def test_a_failed_attempt_is_retried_with_the_same_webhook_id_and_processed_once(user):
    with WebhookReceiver(statuses=[500, 503, 200, 200]) as receiver:
        endpoint_for(receiver, user)
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        sender.send_due()
        delivery = WebhookDelivery.objects.get()
        assert delivery.state == "pending" and delivery.next_attempt_at > timezone.now() - timedelta(seconds=1)
        send_until_settled()
        requests = receiver.wait_for(3)
        # The event again, as a receiver may get it after its own crash: answered, not processed twice.
        services.resend(WebhookDelivery.objects.all(), source="shell")
        send_until_settled()
        requests = receiver.wait_for(4)
    assert len({r.webhook_id for r in requests}) == 1
    assert all(r.signature_ok for r in requests), [r.why for r in requests]
    assert len({r.body for r in requests}) == 1  # the same bytes every time
    assert list(receiver.accepted) == [requests[0].webhook_id]
    delivery = WebhookDelivery.objects.get()
    assert (delivery.state, delivery.attempts) == ("succeeded", 4)
    log = list(delivery.attempt_log.values_list("number", "status_code", "succeeded"))
    assert log == [(1, 500, False), (2, 503, False), (3, 200, True), (4, 200, True)]
    assert counter("http_error") == 2 and counter("succeeded") == 2


def test_a_delivery_gives_up_after_its_retry_window(user, settings):
    settings.WEBHOOK_RETRY_WINDOW_S = 1
    with WebhookReceiver(statuses=[500]) as receiver:
        endpoint_for(receiver, user)
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        send_until_settled()
        assert len(receiver.requests) >= 2
    delivery = WebhookDelivery.objects.get()
    assert delivery.state == "failed" and delivery.next_attempt_at is None
    assert delivery.attempts == delivery.attempt_log.count() == len(receiver.requests)
    assert delivery.last_error == "HTTP 500"


def test_backoff_doubles_with_jitter_within_the_cap(settings):
    import random

    from webhooks import backoff

    settings.WEBHOOK_RETRY_BASE_S = 5
    settings.WEBHOOK_RETRY_MAX_S = 7200
    rng = random.Random(7)
    waits = [backoff.delay(n, rng=rng).total_seconds() for n in range(1, 16)]
    for n, wait in enumerate(waits, start=1):
        nominal = min(5 * 2 ** (n - 1), 7200)
        assert 0.75 * nominal <= wait < 1.25 * nominal
    assert backoff.delay(3, retry_after_s=600).total_seconds() == 600  # Retry-After lengthens
    assert backoff.delay(3, retry_after_s=10**6).total_seconds() == 7200  # within the cap


def test_a_redirect_is_not_followed(user):
    with WebhookReceiver() as target, WebhookReceiver(redirect_to=target.url) as receiver:
        endpoint_for(receiver, user)
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        sender.send_due()
        receiver.wait_for(1)
        time.sleep(0.2)
        assert target.requests == []
    attempt = WebhookDelivery.objects.get().attempt_log.get()
    assert attempt.status_code == 302 and not attempt.succeeded
    assert "redirect to" in attempt.error and "not followed" in attempt.error


def test_410_gone_disables_the_endpoint_and_ends_the_delivery(user):
    with WebhookReceiver(statuses=[410]) as receiver:
        endpoint = endpoint_for(receiver, user)
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        sender.send_due()
        receiver.wait_for(1)
        endpoint.refresh_from_db()
        assert not endpoint.enabled and "410" in endpoint.disabled_reason
        assert WebhookDelivery.objects.get().state == "failed"
        assert events.publish("batch.completed", {"id": "b2"}, owner_id=user.pk, tenant_id=None) == 0


def test_a_disabled_endpoints_pending_delivery_is_not_sent(user):
    with WebhookReceiver() as receiver:
        endpoint = endpoint_for(receiver, user)
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(enabled=False)
        sender.send_due()
        time.sleep(0.1)
        assert receiver.requests == []
    delivery = WebhookDelivery.objects.get()
    assert delivery.state == "failed" and "disabled" in delivery.last_error


def test_a_name_resolving_to_loopback_is_refused_at_send_time(user, settings, monkeypatch):
    """DNS rebinding: the name was public when the endpoint was made, loopback when the event is sent."""
    with WebhookReceiver() as receiver:
        port = receiver.server.server_address[1]
        answers = {"hooks.example.com": "93.184.215.14"}
        real = socket.getaddrinfo

        def fake_dns(host, *args, **kwargs):  # the resolver is the edge here, not our code
            if host in answers:
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", fake_dns)
        settings.WEBHOOK_ALLOW_PRIVATE = False
        endpoint = endpoint_for(receiver, user, url=f"http://hooks.example.com:{port}/hooks")
        assert endpoint.pk
        answers["hooks.example.com"] = "127.0.0.1"
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        sender.send_due()
        time.sleep(0.1)
        assert receiver.requests == []
    attempt = WebhookDelivery.objects.get().attempt_log.get()
    assert attempt.status_code is None and "Refused" in attempt.error
    assert "hooks.example.com resolves to 127.0.0.1" in attempt.error and "loopback" in attempt.error
    assert counter("refused") == 1


def test_an_endpoint_made_while_private_addresses_were_allowed_is_refused_once_they_are_not(user, settings):
    with WebhookReceiver() as receiver:
        endpoint_for(receiver, user, url=receiver.url.replace("127.0.0.1", "localhost"))
        settings.WEBHOOK_ALLOW_PRIVATE = False
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        sender.send_due()
        time.sleep(0.1)
        assert receiver.requests == []
    assert "loopback" in WebhookDelivery.objects.get().attempt_log.get().error


class DripServer:
    """A raw TCP server that answers slowly: a status line then one header byte at a time, or a
    200 with an endless body."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.stop = threading.Event()
        self.sent = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hooks"

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.recv(65536)
        try:
            if self.mode == "headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                while not self.stop.is_set():
                    conn.sendall(b"X")
                    time.sleep(0.05)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
                chunk = b"y" * 65536
                while not self.stop.is_set() and self.sent < 100_000_000:
                    conn.sendall(chunk)
                    self.sent += len(chunk)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_a_receiver_dripping_its_headers_is_cut_off_at_twice_the_timeout(user, settings):
    settings.WEBHOOK_TIMEOUT_S = 0.5
    server = DripServer("headers")
    try:
        endpoint_for(WebhookReceiver(), user, url=server.url)
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        started = time.monotonic()
        sender.send_due()
        took = time.monotonic() - started
    finally:
        server.close()
    attempt = WebhookDelivery.objects.get().attempt_log.get()
    assert not attempt.succeeded and "Timed out" in attempt.error
    assert took < 2 * 0.5 + 1.0, took


def test_only_the_start_of_a_huge_answer_is_read(user, settings):
    settings.WEBHOOK_RESPONSE_MAX_BYTES = 4096
    server = DripServer("body")
    try:
        endpoint_for(WebhookReceiver(), user, url=server.url)
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        started = time.monotonic()
        sender.send_due()
        took = time.monotonic() - started
    finally:
        server.close()
    attempt = WebhookDelivery.objects.get().attempt_log.get()
    assert attempt.succeeded and attempt.response == "y" * 500
    assert took < 2.0 and server.sent < 100_000_000


def test_a_slow_receiver_times_out_and_is_retried(user, settings):
    settings.WEBHOOK_TIMEOUT_S = 0.3
    with WebhookReceiver(hold_s=1.0, hold_first=1) as receiver:
        endpoint_for(receiver, user)
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        sender.send_due()
        first = WebhookDelivery.objects.get().attempt_log.get()
        assert first.status_code is None and "Timed out" in first.error
        send_until_settled()
        requests = receiver.wait_for(2)
    assert requests[0].webhook_id == requests[1].webhook_id
    assert WebhookDelivery.objects.get().state == "succeeded" and counter("timeout") == 1


def test_a_sender_that_stops_returns_what_it_claimed_but_did_not_send(user):
    with WebhookReceiver() as receiver:
        endpoint_for(receiver, user)
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        token, rows = WebhookDelivery.claim_due(10, sender.lease())
        assert len(rows) == 1
        assert WebhookDelivery.claim_due(10, sender.lease()) == ("", [])  # claimed: not due for others
        sender.release(token, [rows[0].pk])
        assert sender.send_due() == 1
        receiver.wait_for(1)


def test_a_lost_claim_is_sent_again_once_its_lease_passed(user):
    """A sender killed mid-send leaves its claim; the delivery is due again when the lease passes."""
    with WebhookReceiver() as receiver:
        endpoint_for(receiver, user)
        events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
        _, rows = WebhookDelivery.claim_due(10, timedelta(seconds=0.3))
        assert rows and sender.send_due() == 0
        time.sleep(0.4)
        assert sender.send_due() == 1
        receiver.wait_for(1)
    assert WebhookDelivery.objects.get().state == "succeeded"


def test_the_sender_threads_send_at_once_when_woken(user, settings):
    settings.WEBHOOK_POLL_S = 30  # so only the bell can explain a quick send
    with WebhookReceiver() as receiver:
        endpoint_for(receiver, user)
        threads = sender.Sender("test", threads=2)
        threads.start()
        try:
            time.sleep(0.3)  # the dispatcher is now waiting on the bell
            started = time.monotonic()
            events.publish("batch.completed", {"id": "b1"}, owner_id=user.pk, tenant_id=None)
            receiver.wait_for(1, timeout=5)
            assert time.monotonic() - started < 2.5
        finally:
            threads.stop()
