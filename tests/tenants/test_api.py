"""``/tenants``: CRUD with every field, validation answered 400 naming the field, model permissions
for every call (reads included), members (409 unless moved), all audited."""

from __future__ import annotations

import pytest
from rest_framework.authtoken.models import Token

from audit.models import AuditEntry
from jobs.models import Job
from routing.models import Backend, BackendKind
from tenants import identity
from tenants.models import ApiKey, Membership, Tenant
from tests.conftest import token_client
from tests.factories import make_job
from tests.tenants.conftest import staff_with

pytestmark = pytest.mark.django_db

FULL = {
    "name": "acme",
    "description": "Acme Corp",
    "enabled": True,
    "rpm_limit": 600,
    "tokens_per_day": 5_000_000,
    "budget_usd": "125.5000",
    "budget_period": "day",
    "max_priority": "normal",
    "allowed_backends": ["dev"],
    "weight": 3,
    "max_queued": 1000,
    "queue_timeout_s": 120,
}


def test_staff_create_read_update_and_delete_a_tenant_with_every_field(staff_api, dev_backend):
    created = staff_api.post("/tenants", FULL, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert {k: body[k] for k in FULL} == FULL
    pk = body["id"]

    assert staff_api.get("/tenants").json()[0]["name"] == "acme"
    assert staff_api.get(f"/tenants/{pk}").json()["weight"] == 3

    patched = staff_api.patch(f"/tenants/{pk}/", {"weight": 7, "rpm_limit": None, "enabled": False}, format="json")
    assert patched.status_code == 200, patched.content
    tenant = Tenant.objects.get(pk=pk)
    assert (tenant.weight, tenant.rpm_limit, tenant.enabled) == (7, None, False)

    assert staff_api.delete(f"/tenants/{pk}").status_code == 204
    assert not Tenant.objects.filter(pk=pk).exists()
    actions = list(AuditEntry.objects.filter(target_type="tenants.tenant").values_list("action", flat=True))
    assert sorted(actions) == ["create", "delete", "update"]
    update = AuditEntry.objects.get(target_type="tenants.tenant", action="update")
    assert update.changes == {"weight": [3, 7], "rpm_limit": [600, None], "enabled": [True, False]}


def test_defaults_when_only_a_name_is_given(staff_api):
    body = staff_api.post("/tenants", {"name": "small"}, format="json").json()
    assert body["weight"] == 1 and body["max_priority"] == "high" and body["allowed_backends"] == []
    assert body["rpm_limit"] is None and body["budget_usd"] is None and body["enabled"] is True


def test_allowed_backends_are_deduplicated(staff_api, dev_backend):
    body = staff_api.post("/tenants", {"name": "t", "allowed_backends": ["dev", "dev"]}, format="json").json()
    assert body["allowed_backends"] == ["dev"]


def test_unknown_backends_are_400_naming_each(staff_api, dev_backend):
    r = staff_api.post("/tenants", {"name": "t", "allowed_backends": ["dev", "gpt-9", "nope"]}, format="json")
    assert r.status_code == 400
    assert r.json()["allowed_backends"] == ["Unknown backends: gpt-9, nope."]
    assert not Tenant.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "has spaces"}, "name"),
        ({"name": 5}, "name"),
        ({"weight": 0}, "weight"),
        ({"weight": 1001}, "weight"),
        ({"weight": "heavy"}, "weight"),
        ({"weight": 1.5}, "weight"),
        ({"rpm_limit": -1}, "rpm_limit"),
        ({"tokens_per_day": 2**70}, "tokens_per_day"),
        ({"budget_usd": "-1"}, "budget_usd"),
        ({"budget_usd": "lots"}, "budget_usd"),
        ({"budget_usd": "1" * 20}, "budget_usd"),
        ({"budget_period": "year"}, "budget_period"),
        ({"max_priority": "urgent"}, "max_priority"),
        ({"allowed_backends": "dev"}, "allowed_backends"),
        ({"allowed_backends": [1]}, "allowed_backends"),
        ({"allowed_backends": [""]}, "allowed_backends"),
        ({"allowed_backends": {"dev": 1}}, "allowed_backends"),
        ({"queue_timeout_s": 0}, "queue_timeout_s"),
        ({"max_queued": 2**40}, "max_queued"),
        ({"description": "x" * 201}, "description"),
    ],
)
def test_invalid_tenant_is_400_naming_the_field(staff_api, body, field):
    r = staff_api.post("/tenants", {"name": "t", **body}, format="json")
    assert r.status_code == 400, r.content
    assert field in r.json()


def test_duplicate_name_is_400(staff_api, tenant):
    r = staff_api.post("/tenants", {"name": "acme"}, format="json")
    assert r.status_code == 400 and "name" in r.json()


def test_invalid_update_is_400_and_changes_nothing(staff_api, tenant):
    r = staff_api.patch(f"/tenants/{tenant.pk}", {"weight": 5000, "description": "new"}, format="json")
    assert r.status_code == 400
    tenant.refresh_from_db()
    assert (tenant.weight, tenant.description) == (1, "Acme Corp")


@pytest.mark.parametrize("path", ["/tenants/abc", "/tenants/99999999999999999999999", "/tenants/0", "/tenants/1/x"])
def test_a_bad_tenant_path_is_a_json_404(staff_api, tenant, path):
    r = staff_api.get(path)
    assert r.status_code == 404 and "detail" in r.json()


def test_a_non_json_body_is_a_4xx(staff_api):
    r = staff_api.post("/tenants", "not json", content_type="application/json")
    assert r.status_code == 400


# --- permissions -------------------------------------------------------------------------------------
def test_a_client_may_not_read_or_write_tenants(api, tenant):
    assert api.get("/tenants").status_code == 403
    assert api.get(f"/tenants/{tenant.pk}").status_code == 403
    assert api.post("/tenants", {"name": "mine"}, format="json").status_code == 403
    assert api.get(f"/tenants/{tenant.pk}/keys").status_code == 403
    assert api.post(f"/tenants/{tenant.pk}/keys", {"name": "k"}, format="json").status_code == 403
    assert api.post(f"/tenants/{tenant.pk}/members", {"username": "alice"}, format="json").status_code == 403
    assert not ApiKey.objects.exists() and not Membership.objects.exists()


def test_anonymous_is_401(client, tenant):
    assert client.get("/tenants").status_code == 401


def test_staff_without_the_model_permissions_is_403(django_user_model, tenant):
    api = token_client(staff_with(django_user_model, "plainstaff", []))
    assert api.get("/tenants").status_code == 403
    assert api.patch(f"/tenants/{tenant.pk}", {"weight": 2}, format="json").status_code == 403
    assert api.delete(f"/tenants/{tenant.pk}").status_code == 403
    assert api.get(f"/tenants/{tenant.pk}/members").status_code == 403
    assert Tenant.objects.get(pk=tenant.pk).weight == 1


def test_each_method_needs_its_own_permission(django_user_model, tenant, user):
    viewer = token_client(staff_with(django_user_model, "viewer", ["view_tenant", "view_membership", "view_apikey"]))
    assert viewer.get("/tenants").status_code == 200
    assert viewer.get(f"/tenants/{tenant.pk}/members").status_code == 200
    assert viewer.get(f"/tenants/{tenant.pk}/keys").status_code == 200
    assert viewer.post("/tenants", {"name": "new"}, format="json").status_code == 403
    assert viewer.patch(f"/tenants/{tenant.pk}", {"weight": 2}, format="json").status_code == 403
    assert viewer.post(f"/tenants/{tenant.pk}/keys", {"name": "k"}, format="json").status_code == 403
    assert viewer.post(f"/tenants/{tenant.pk}/members", {"username": "alice"}, format="json").status_code == 403

    editor = token_client(
        staff_with(
            django_user_model,
            "editor",
            ["view_tenant", "add_tenant", "change_tenant", "add_apikey", "add_membership", "change_membership"],
        )
    )
    assert editor.post("/tenants", {"name": "new"}, format="json").status_code == 201
    assert editor.patch(f"/tenants/{tenant.pk}", {"weight": 2}, format="json").status_code == 200
    assert editor.post(f"/tenants/{tenant.pk}/keys", {"name": "k"}, format="json").status_code == 201
    assert editor.post(f"/tenants/{tenant.pk}/members", {"username": "alice"}, format="json").status_code == 201
    key = ApiKey.objects.get()
    assert editor.delete(f"/tenants/{tenant.pk}/keys/{key.pk}").status_code == 403  # revoking needs change_apikey
    assert editor.delete(f"/tenants/{tenant.pk}").status_code == 403
    assert ApiKey.objects.get().revoked_at is None


# --- members -----------------------------------------------------------------------------------------
def test_add_list_and_remove_members(staff_api, tenant, user, django_user_model):
    bob = django_user_model.objects.create_user("bob", password="pw-bob-123")
    r = staff_api.post(f"/tenants/{tenant.pk}/members", {"username": "alice"}, format="json")
    assert r.status_code == 201, r.content
    assert r.json()["username"] == "alice" and r.json()["user_id"] == user.pk
    assert staff_api.post(f"/tenants/{tenant.pk}/members", {"username": "bob"}, format="json").status_code == 201
    again = staff_api.post(f"/tenants/{tenant.pk}/members", {"username": "alice"}, format="json")
    assert again.status_code == 200

    listed = staff_api.get(f"/tenants/{tenant.pk}/members").json()
    assert [m["username"] for m in listed] == ["alice", "bob"]

    assert staff_api.delete(f"/tenants/{tenant.pk}/members/alice").status_code == 204
    assert staff_api.delete(f"/tenants/{tenant.pk}/members/{bob.pk}/").status_code == 204
    assert staff_api.delete(f"/tenants/{tenant.pk}/members/alice").status_code == 404
    assert not Membership.objects.exists()
    actions = sorted(AuditEntry.objects.filter(target_type="tenants.membership").values_list("action", flat=True))
    assert actions == ["add_member", "add_member", "remove_member", "remove_member"]


def test_a_member_of_another_tenant_is_409_naming_it_unless_moved(staff_api, tenant, user):
    other = Tenant.objects.create(name="globex")
    Membership.objects.create(user=user, tenant=other)

    refused = staff_api.post(f"/tenants/{tenant.pk}/members", {"username": "alice"}, format="json")
    assert refused.status_code == 409
    assert refused.json()["tenant"] == "globex" and "globex" in refused.json()["detail"]
    assert Membership.objects.get(user=user).tenant == other

    moved = staff_api.post(f"/tenants/{tenant.pk}/members", {"username": "alice", "move": True}, format="json")
    assert moved.status_code == 201
    assert Membership.objects.get(user=user).tenant == tenant
    entry = AuditEntry.objects.get(action="move_member")
    assert entry.changes == {"tenant": ["globex", "acme"]} and entry.target_name == "alice"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "nobody"}, "username"),
        ({"username": 7}, "username"),
        ({}, "username"),
        ({"username": "alice", "move": "yes"}, "move"),
        ({"username": "alice", "move": 1}, "move"),
    ],
)
def test_bad_member_requests_are_400_naming_the_field(staff_api, tenant, user, body, field):
    r = staff_api.post(f"/tenants/{tenant.pk}/members", body, format="json")
    assert r.status_code == 400 and field in r.json(), r.content
    assert not Membership.objects.exists()


def test_a_service_user_cannot_be_a_member(staff_api, tenant, issued):
    from tests.tenants.conftest import key_client

    key_client(issued[1]).get("/jobs")  # creates the service user
    r = staff_api.post(f"/tenants/{tenant.pk}/members", {"username": f"tenant:{tenant.pk}"}, format="json")
    assert r.status_code == 400 and "username" in r.json()


@pytest.mark.django_db(transaction=True)
def test_membership_changes_reach_the_remembered_tenant_at_once(staff_api, tenant, user):
    other = Tenant.objects.create(name="globex")
    assert identity.tenant_of_user(user.pk) is None  # remembered: no tenant
    staff_api.post(f"/tenants/{tenant.pk}/members", {"username": "alice"}, format="json")
    assert identity.tenant_of_user(user.pk) == tenant
    staff_api.post(f"/tenants/{other.pk}/members", {"username": "alice", "move": True}, format="json")
    assert identity.tenant_of_user(user.pk) == other
    staff_api.delete(f"/tenants/{other.pk}/members/alice")
    assert identity.tenant_of_user(user.pk) is None


def test_deleting_a_tenant_keeps_its_jobs_without_it(staff_api, tenant, user, issued):
    Membership.objects.create(user=user, tenant=tenant)
    backend = Backend.objects.create(name="dev", kind=BackendKind.DEV)
    job = make_job(backend, tenant=tenant)
    assert staff_api.delete(f"/tenants/{tenant.pk}").status_code == 204
    assert Job.objects.get(pk=job.pk).tenant is None
    assert not Membership.objects.exists() and not ApiKey.objects.exists()
    assert Token.objects.count() == 1  # the staff client's own
