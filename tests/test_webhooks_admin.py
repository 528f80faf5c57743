"""Webhooks in the admin: the secret shown once (made, rotated), deliveries with attempts, resend."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.utils import timezone

from webhooks import services, subscribers
from webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint

pytestmark = pytest.mark.django_db
URL = "https://93.184.215.14/hooks"


@pytest.fixture(autouse=True)
def fresh_subscribers():
    subscribers.forget()
    yield
    subscribers.forget()


def texts(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def failed_delivery(owner) -> WebhookDelivery:
    endpoint = services.create(owner=owner, url=URL, events=["job.failed"], source="shell")
    now = timezone.now()
    delivery = WebhookDelivery.objects.create(
        endpoint=endpoint,
        event_type="job.failed",
        payload='{"type":"job.failed","timestamp":"2026-01-01T00:00:00.000000Z","data":{}}',
        state="failed",
        attempts=2,
        give_up_at=now,
        last_status=500,
        last_error="HTTP 500",
    )
    for n in (1, 2):
        WebhookAttempt.objects.create(delivery=delivery, number=n, status_code=500, error="HTTP 500", latency_ms=12)
    return delivery


def test_an_endpoint_made_in_the_admin_shows_its_secret_once(admin_client, staff):
    r = admin_client.post(
        "/admin/webhooks/webhookendpoint/add/",
        {"owner": staff.pk, "url": URL, "events": ["job.succeeded", "batch.completed"], "enabled": "on"},
        follow=True,
    )
    assert r.status_code == 200
    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.events == ["job.succeeded", "batch.completed"] and endpoint.secret.startswith("whsec_")
    assert any(endpoint.secret in t for t in texts(r))
    page = admin_client.get(f"/admin/webhooks/webhookendpoint/{endpoint.pk}/change/").content.decode()
    listing = admin_client.get("/admin/webhooks/webhookendpoint/").content.decode()
    assert endpoint.secret not in page and endpoint.secret not in listing
    assert endpoint.secret.removeprefix("whsec_")[:12] not in page


def test_the_admin_refuses_a_private_url(admin_client, staff, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    r = admin_client.post(
        "/admin/webhooks/webhookendpoint/add/",
        {"owner": staff.pk, "url": "http://10.0.0.1/x", "events": ["job.failed"], "enabled": "on"},
    )
    assert r.status_code == 200 and "private address" in r.content.decode()
    assert not WebhookEndpoint.objects.exists()


def test_rotating_the_secret_shows_the_new_one_once(admin_client, staff):
    endpoint = services.create(owner=staff, url=URL, events=["job.failed"], source="shell")
    old = endpoint.secret
    r = admin_client.post(
        "/admin/webhooks/webhookendpoint/",
        {"action": "rotate_secrets", "_selected_action": [endpoint.pk]},
        follow=True,
    )
    endpoint.refresh_from_db()
    assert endpoint.secret != old and any(endpoint.secret in t for t in texts(r))


def test_deliveries_list_with_filters_and_show_their_attempts(admin_client, staff):
    delivery = failed_delivery(staff)
    for query in (
        "",
        "?state__exact=failed",
        "?event_type__exact=job.failed",
        f"?endpoint__id__exact={delivery.endpoint_id}",
    ):
        r = admin_client.get(f"/admin/webhooks/webhookdelivery/{query}")
        assert r.status_code == 200 and delivery.message_id in r.content.decode()
    page = admin_client.get(f"/admin/webhooks/webhookdelivery/{delivery.pk}/change/").content.decode()
    assert page.count("HTTP 500") >= 2 and "job.failed" in page and delivery.endpoint.secret not in page


def test_resend_makes_a_given_up_delivery_due_now_with_a_new_window(admin_client, staff):
    delivery = failed_delivery(staff)
    r = admin_client.post(
        "/admin/webhooks/webhookdelivery/", {"action": "resend", "_selected_action": [delivery.pk]}, follow=True
    )
    assert r.status_code == 200
    delivery.refresh_from_db()
    assert delivery.state == "pending" and delivery.next_attempt_at <= timezone.now()
    assert delivery.give_up_at > timezone.now() and delivery.round_start == 2
    assert WebhookDelivery.claim_due(10, timezone.timedelta(seconds=30))[1] == [delivery]


def test_resend_needs_the_change_permission(client, django_user_model, staff):
    delivery = failed_delivery(staff)
    viewer = django_user_model.objects.create_user("viewer", password="pw-viewer-123", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_webhookdelivery"))
    client.force_login(viewer)
    r = client.post("/admin/webhooks/webhookdelivery/", {"action": "resend", "_selected_action": [delivery.pk]})
    assert r.status_code == 403
    delivery.refresh_from_db()
    assert delivery.state == "failed"
