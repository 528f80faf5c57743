"""``/webhooks``: making, listing, reading and deleting endpoints; who sees which; what is refused."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from audit.models import AuditEntry
from tenants.models import Tenant
from tests.conftest import token_client
from webhooks import subscribers
from webhooks.models import WebhookEndpoint

pytestmark = pytest.mark.django_db

PUBLIC_URL = "https://93.184.215.14/hooks"  # a literal public address: no DNS needed


@pytest.fixture(autouse=True)
def fresh_subscribers():
    subscribers.forget()
    yield
    subscribers.forget()


def make(api: APIClient, **body) -> dict:
    r = api.post("/webhooks", {"url": PUBLIC_URL, "events": ["job.succeeded"], **body}, format="json")
    assert r.status_code == 201, r.content
    return r.json()


def test_create_answers_the_secret_once_and_never_again(api, user):
    made = make(api, events=["job.succeeded", "job.failed"], description="ci")
    assert made["secret"].startswith("whsec_")
    assert (made["url"], made["events"], made["enabled"], made["tenant"]) == (
        PUBLIC_URL,
        ["job.succeeded", "job.failed"],
        True,
        None,
    )
    endpoint = WebhookEndpoint.objects.get(pk=made["id"])
    assert endpoint.secret == made["secret"] and endpoint.owner == user
    shown = api.get(f"/webhooks/{made['id']}").json()
    listed = api.get("/webhooks").json()
    assert "secret" not in shown and all("secret" not in e for e in listed)
    assert made["secret"] not in str(api.get("/webhooks").content)
    entry = AuditEntry.objects.get(target_type="webhooks.webhookendpoint", action="create")
    assert made["secret"] not in str(entry.changes)


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"events": ["job.done"]}, "events", "job.done"),
        ({"events": []}, "events", ""),
        ({"events": "job.failed"}, "events", ""),
        ({"url": "ftp://93.184.215.14/x"}, "url", "http"),
        ({"url": "not a url"}, "url", ""),
        ({"url": "http://127.0.0.1:9/hook"}, "url", "loopback"),
        ({"url": "http://2130706433/hook"}, "url", "loopback"),  # 127.0.0.1 written as one number
        ({"url": "http://localhost/hook"}, "url", "loopback"),
        ({"url": "http://[::1]/hook"}, "url", "loopback"),
        ({"url": "http://[::ffff:10.0.0.1]/hook"}, "url", "private"),
        ({"url": "http://10.1.2.3/hook"}, "url", "private"),
        ({"url": "http://192.168.0.10/hook"}, "url", "private"),
        ({"url": "http://100.64.0.1/hook"}, "url", "carrier-grade NAT"),
        ({"url": "http://169.254.169.254/latest"}, "url", "link-local"),
        ({"url": "http://metadata.google.internal/"}, "url", "metadata"),
        ({"url": "http://0.0.0.0/hook"}, "url", "unspecified"),
        ({"url": "http://224.0.0.1/hook"}, "url", "multicast"),
        ({"url": "https://user:pw@93.184.215.14/hook"}, "url", "Credentials"),
        ({"secret": "whsec_mine"}, "secret", "Unknown field"),
        ({"url": 5}, "url", ""),
    ],
)
def test_invalid_endpoints_are_refused_naming_the_field(api, settings, body, field, says):
    settings.WEBHOOK_ALLOW_PRIVATE = False
    r = api.post("/webhooks", {"url": PUBLIC_URL, "events": ["job.succeeded"], **body}, format="json")
    assert r.status_code == 400, r.content
    assert field in r.json() and says in str(r.json()[field]), r.json()
    assert not WebhookEndpoint.objects.exists()


def test_private_addresses_are_allowed_with_the_setting_but_link_local_never(api, settings):
    settings.WEBHOOK_ALLOW_PRIVATE = True
    assert make(api, url="http://127.0.0.1:8080/hook")["url"] == "http://127.0.0.1:8080/hook"
    assert make(api, url="http://10.0.0.5/hook")
    r = api.post("/webhooks", {"url": "http://169.254.169.254/", "events": ["job.failed"]}, format="json")
    assert r.status_code == 400 and "link-local" in str(r.json()["url"])


def test_a_user_sees_only_their_own_endpoints(api, django_user_model):
    mine = make(api)
    other = token_client(django_user_model.objects.create_user("bob", password="pw-bob-12345"))
    theirs = make(other)
    assert [e["id"] for e in api.get("/webhooks").json()] == [mine["id"]]
    assert api.get(f"/webhooks/{theirs['id']}").status_code == 404
    assert api.delete(f"/webhooks/{theirs['id']}").status_code == 404
    assert WebhookEndpoint.objects.filter(pk=theirs["id"]).exists()
    assert api.get("/webhooks/abc").status_code == 404
    assert api.get("/webhooks/99999999999999999999999").status_code == 404


def test_a_tenant_key_sees_its_tenants_endpoints_and_makes_tenant_endpoints(api, db):
    tenant = Tenant.objects.create(name="acme")
    _, raw = keys_issue(tenant)
    key_api = APIClient()
    key_api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    made = make(key_api)
    assert made["tenant"] == "acme"
    assert WebhookEndpoint.objects.get(pk=made["id"]).tenant == tenant
    _, raw2 = keys_issue(tenant, "second")
    second = APIClient()
    second.credentials(HTTP_AUTHORIZATION=f"Bearer {raw2}")
    assert [e["id"] for e in second.get("/webhooks").json()] == [made["id"]]  # every key of the tenant
    mine = make(api)
    assert [e["id"] for e in key_api.get("/webhooks").json()] == [made["id"]]
    assert key_api.get(f"/webhooks/{mine['id']}").status_code == 404
    other = Tenant.objects.create(name="other")
    _, raw3 = keys_issue(other)
    outsider = APIClient()
    outsider.credentials(HTTP_AUTHORIZATION=f"Bearer {raw3}")
    assert outsider.get("/webhooks").json() == []
    assert outsider.delete(f"/webhooks/{made['id']}").status_code == 404


def keys_issue(tenant: Tenant, name: str = "ci"):
    from tenants import services

    return services.issue_key(tenant, name, source="shell")


def test_staff_with_the_view_permission_see_all_and_delete_with_the_delete_permission(api, django_user_model):
    from django.contrib.auth.models import Permission

    theirs = make(api)
    viewer = django_user_model.objects.create_user("viewer", password="pw-viewer-123", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_webhookendpoint"))
    viewer_api = token_client(viewer)
    assert [e["id"] for e in viewer_api.get("/webhooks").json()] == [theirs["id"]]
    assert viewer_api.delete(f"/webhooks/{theirs['id']}").status_code == 403
    staff_only = token_client(django_user_model.objects.create_user("staffer", password="pw-staff-123", is_staff=True))
    assert staff_only.get("/webhooks").json() == []  # the staff flag alone allows nothing
    viewer.user_permissions.add(Permission.objects.get(codename="delete_webhookendpoint"))
    viewer_api = token_client(django_user_model.objects.get(pk=viewer.pk))
    assert viewer_api.delete(f"/webhooks/{theirs['id']}").status_code == 204
    assert not WebhookEndpoint.objects.exists()


def test_delete_removes_the_endpoint_and_is_audited(api):
    made = make(api)
    assert api.delete(f"/webhooks/{made['id']}/").status_code == 204
    assert api.get(f"/webhooks/{made['id']}").status_code == 404
    assert AuditEntry.objects.filter(target_type="webhooks.webhookendpoint", action="delete").count() == 1


def test_anonymous_callers_are_refused(db):
    anonymous = APIClient()
    assert anonymous.get("/webhooks").status_code == 401
    assert anonymous.post("/webhooks", {"url": PUBLIC_URL, "events": ["job.failed"]}, format="json").status_code == 401


def test_endpoints_per_owner_are_capped(api):
    from webhooks.api.views import MAX_ENDPOINTS

    for _ in range(MAX_ENDPOINTS):
        make(api)
    r = api.post("/webhooks", {"url": PUBLIC_URL, "events": ["job.failed"]}, format="json")
    assert r.status_code == 400 and "At most" in str(r.json())
