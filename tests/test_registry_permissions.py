"""Least privilege on ``/backends`` and ``/policies``: writes need the model permission, not the staff
flag; client programs read a summary of the enabled backends, operators the full record (no key)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from audit.models import AuditEntry
from routing.models import Backend, BackendKind, PolicyChange, RoutingPolicy

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "sk-never-shown-7777"
SUMMARY_FIELDS = {"id", "name", "kind", "model", "supports_multimodal", "enabled"}


def client_for(django_user_model, username: str, codenames: list[str], *, is_staff: bool = True) -> APIClient:
    user = django_user_model.objects.create_user(username, password=f"pw-{username}-123", is_staff=is_staff)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def cloud(db) -> Backend:
    return Backend.objects.create(
        name="cloud",
        kind=BackendKind.OPENAI,
        base_url="https://api.example.com/v1",
        model="gpt-x",
        api_key=SECRET,
        config={"organization": "acme"},
        cost_input_per_1k="0.5",
    )


@pytest.fixture
def off(db) -> Backend:
    return Backend.objects.create(name="off", kind=BackendKind.DEV, enabled=False)


def test_staff_without_permissions_can_write_nothing(django_user_model, cloud, policy):
    """The staff flag alone was enough before: a staff user with no permission created a backend."""
    staff = client_for(django_user_model, "bare-staff", [])
    rows = list(Backend.objects.order_by("pk").values())

    assert staff.post("/backends", {"name": "mine", "kind": "dev"}, format="json").status_code == 403
    assert staff.patch(f"/backends/{cloud.pk}", {"enabled": False}, format="json").status_code == 403
    assert staff.delete(f"/backends/{cloud.pk}").status_code == 403
    assert staff.post("/policies", {"name": "x", "strategy": "ordered"}, format="json").status_code == 403
    assert staff.post(f"/policies/{policy.pk}/activate").status_code == 403

    assert list(Backend.objects.order_by("pk").values()) == rows
    assert list(RoutingPolicy.objects.values_list("name", "is_active")) == [("default", True)]
    assert not AuditEntry.objects.exists()


def test_view_permission_reads_in_full_but_writes_nothing(django_user_model, cloud, policy):
    viewer = client_for(django_user_model, "viewer", ["view_backend", "view_routingpolicy"])
    other = RoutingPolicy.objects.create(name="other", strategy="least_busy")
    policy_entries = PolicyChange.objects.count()

    assert viewer.patch(f"/backends/{cloud.pk}", {"weight": 9}, format="json").status_code == 403
    assert viewer.put(f"/backends/{cloud.pk}", {"name": "cloud", "kind": "dev"}, format="json").status_code == 403
    assert viewer.patch(f"/policies/{other.pk}", {"description": "x"}, format="json").status_code == 403
    assert viewer.delete(f"/policies/{other.pk}").status_code == 403
    assert viewer.post(f"/policies/{other.pk}/activate").status_code == 403

    assert Backend.objects.get(pk=cloud.pk).weight == 1
    assert RoutingPolicy.objects.get(is_active=True).name == "default"
    assert PolicyChange.objects.count() == policy_entries
    assert not AuditEntry.objects.exists()


def test_each_write_needs_its_own_permission(django_user_model, cloud, policy):
    adder = client_for(django_user_model, "adder", ["add_backend", "add_routingpolicy"])
    changer = client_for(django_user_model, "changer", ["change_backend", "change_routingpolicy"])
    deleter = client_for(django_user_model, "deleter", ["delete_backend", "delete_routingpolicy"])

    r = adder.post("/backends", {"name": "new", "kind": "dev"}, format="json")
    assert r.status_code == 201, r.content
    new = r.json()["id"]
    assert adder.patch(f"/backends/{new}", {"weight": 2}, format="json").status_code == 403
    assert changer.post("/backends", {"name": "new2", "kind": "dev"}, format="json").status_code == 403
    assert changer.patch(f"/backends/{new}", {"weight": 2}, format="json").status_code == 200
    assert changer.delete(f"/backends/{new}").status_code == 403
    assert deleter.delete(f"/backends/{new}").status_code == 204

    r = adder.post("/policies", {"name": "fast", "strategy": "fastest"}, format="json")
    assert r.status_code == 201, r.content
    fast = r.json()["id"]
    assert adder.post(f"/policies/{fast}/activate").status_code == 403  # activation is a change
    assert changer.post(f"/policies/{fast}/activate").status_code == 200
    assert RoutingPolicy.objects.get(is_active=True).name == "fast"
    assert deleter.delete(f"/policies/{policy.pk}").status_code == 204


def test_clients_read_a_summary_of_the_enabled_backends_only(api, cloud, off):
    listing = api.get("/backends")
    assert listing.status_code == 200
    assert [b["name"] for b in listing.json()] == ["cloud"]
    assert set(listing.json()[0]) == SUMMARY_FIELDS
    detail = api.get(f"/backends/{cloud.pk}")
    assert detail.status_code == 200 and set(detail.json()) == SUMMARY_FIELDS
    for leak in ("api.example.com", "acme", "0.5", SECRET):
        assert leak not in listing.content.decode() + detail.content.decode()
    assert api.get(f"/backends/{off.pk}").status_code == 404


def test_operators_with_view_permission_read_every_backend_in_full_but_never_the_key(django_user_model, cloud, off):
    viewer = client_for(django_user_model, "viewer", ["view_backend"])
    listing = viewer.get("/backends").json()
    assert [b["name"] for b in listing] == ["cloud", "off"]
    full = listing[0]
    assert (full["base_url"], full["config"], full["cost_input_per_1k"]) == (
        "https://api.example.com/v1",
        {"organization": "acme"},
        "0.500000",
    )
    assert full["has_api_key"] is True and "api_key" not in full
    assert SECRET not in viewer.get(f"/backends/{cloud.pk}").content.decode()
