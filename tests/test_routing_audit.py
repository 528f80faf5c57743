"""The policy audit log through the API and the model: who changed what, from what to what."""

from __future__ import annotations

import pytest

from routing import policies
from routing.models import PolicyChange, RoutingPolicy

pytestmark = pytest.mark.django_db(transaction=True)


def test_api_writes_are_audited_with_their_user(staff_api, staff, policy):
    r = staff_api.post("/policies", {"name": "cheap", "strategy": "cheapest", "params": {}}, format="json")
    assert r.status_code == 201, r.content
    pk = r.json()["id"]
    r = staff_api.patch(f"/policies/{pk}", {"params": {"max_p95_ms": 900}}, format="json")
    assert r.status_code == 200, r.content
    assert staff_api.post(f"/policies/{pk}/activate").status_code == 200
    assert staff_api.post(f"/policies/{policy.pk}/activate").status_code == 200
    assert staff_api.delete(f"/policies/{pk}").status_code == 204

    log = list(PolicyChange.objects.filter(source="api").order_by("at", "id"))
    assert [(e.action, e.policy_name) for e in log] == [
        ("create", "cheap"),
        ("update", "cheap"),
        ("activate", "cheap"),
        ("activate", "default"),
        ("delete", "cheap"),
    ]
    assert {e.username for e in log} == {staff.username}
    create, update, activate, back, delete = log
    assert create.before == {} and create.after["strategy"] == "cheapest"
    assert (update.before["params"], update.after["params"]) == ({}, {"max_p95_ms": 900})
    assert (activate.before["name"], activate.after["name"], activate.after["is_active"]) == ("default", "cheap", True)
    assert (back.before["name"], back.after["name"]) == ("cheap", "default")
    assert delete.after == {} and delete.policy is None  # the policy is gone, the entry stays


def test_rejected_writes_leave_no_entry(staff_api, api, policy):
    before = PolicyChange.objects.count()
    assert staff_api.patch(f"/policies/{policy.pk}", {"params": {"order": "x"}}, format="json").status_code == 400
    assert staff_api.delete(f"/policies/{policy.pk}").status_code == 409
    assert api.post(f"/policies/{policy.pk}/activate").status_code == 403
    assert PolicyChange.objects.count() == before


def test_activation_from_a_shell_is_audited_too(db, policy):
    other = RoutingPolicy.objects.create(name="other", strategy="least_busy")
    policies.activate(other)
    entry = PolicyChange.objects.get(action="activate", policy=other)
    assert (entry.source, entry.user, entry.username) == ("shell", None, "")
    assert entry.version == other.version
