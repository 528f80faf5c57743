"""The operators' audit log: every admin/API change to a backend and every job an operator moved is
recorded with who, from where and field by field what changed; secrets only as "changed"; the log
is read-only in the admin."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from audit.models import AuditEntry
from jobs.models import JobState
from routing import circuit
from routing.circuit import CircuitConfig
from routing.models import Backend, BackendKind, PolicyChange, RoutingPolicy
from tests.factories import make_job
from tests.fakes.ollama_server import OllamaFake

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "sk-audit-secret-1234"
NEW_SECRET = "sk-audit-secret-5678"


def entries(**filters) -> list[AuditEntry]:
    return list(AuditEntry.objects.filter(**filters).order_by("at", "id"))


def the_whole_log() -> str:
    return json.dumps(list(AuditEntry.objects.values()), default=str)


def form_data(**fields) -> dict:
    """The backend change form as the browser posts it."""
    return {
        "name": "cloud",
        "kind": "openai",
        "enabled": "on",
        "base_url": "https://api.example.com/v1",
        "model": "gpt-x",
        "api_key": "",
        "max_context_tokens": 8192,
        "max_concurrency": 4,
        "weight": 1,
        "timeout_s": 30,
        "cost_input_per_1k": "0",
        "cost_output_per_1k": "0",
        "config": "{}",
        "pool": "",
        **fields,
    }


def test_api_backend_create_edit_delete_are_logged_with_actor_and_diff(staff_api, staff):
    r = staff_api.post(
        "/backends",
        {"name": "cloud", "kind": "openai", "base_url": "https://api.example.com/v1", "api_key": SECRET},
        format="json",
    )
    assert r.status_code == 201, r.content
    pk = r.json()["id"]
    assert staff_api.patch(f"/backends/{pk}", {"weight": 3, "api_key": NEW_SECRET}, format="json").status_code == 200
    assert staff_api.patch(f"/backends/{pk}", {"weight": 3}, format="json").status_code == 200  # no change, no entry
    assert staff_api.delete(f"/backends/{pk}").status_code == 204

    log = entries(target_type="routing.backend")
    assert [(e.action, e.target_name, e.source, e.user, e.username) for e in log] == [
        ("create", "cloud", "api", staff, staff.username),
        ("update", "cloud", "api", staff, staff.username),
        ("delete", "cloud", "api", staff, staff.username),
    ]
    create, update, delete = log
    assert create.changes["kind"] == [None, "openai"]
    assert create.changes["api_key"] == ["not set", "changed"]
    assert update.changes == {"weight": [1, 3], "api_key": ["set", "changed"]}
    assert delete.changes["base_url"] == ["https://api.example.com/v1", None]
    assert delete.target_id == str(pk)
    assert SECRET not in the_whole_log() and NEW_SECRET not in the_whole_log()


def test_admin_backend_form_changes_are_logged_field_by_field(admin_client, staff):
    r = admin_client.post(reverse("admin:routing_backend_add"), form_data(api_key=SECRET))
    assert r.status_code == 302, r.content.decode()[:2000]
    backend = Backend.objects.get(name="cloud")
    change = reverse("admin:routing_backend_change", args=[backend.pk])
    r = admin_client.post(change, form_data(model="gpt-y", cost_input_per_1k="0.25", config='{"organization": "acme"}'))
    assert r.status_code == 302, r.content.decode()[:2000]
    r = admin_client.post(change, form_data(model="gpt-y", clear_api_key="on", cost_input_per_1k="0.25"))
    assert r.status_code == 302
    admin_client.post(reverse("admin:routing_backend_delete", args=[backend.pk]), {"post": "yes"})
    assert not Backend.objects.filter(name="cloud").exists()

    create, edit, clear, delete = entries(target_type="routing.backend")
    assert all((e.user, e.source) == (staff, "admin") for e in (create, edit, clear, delete))
    assert [e.action for e in (create, edit, clear, delete)] == ["create", "update", "update", "delete"]
    assert edit.changes == {
        "model": ["gpt-x", "gpt-y"],
        "cost_input_per_1k": ["0.000000", "0.250000"],
        "config": [{}, {"organization": "acme"}],
    }
    assert clear.changes == {"api_key": ["set", "cleared"], "config": [{"organization": "acme"}, {}]}
    assert SECRET not in the_whole_log()


def test_admin_switches_and_circuit_close_are_logged(admin_client, staff, dev_backend):
    url = reverse("admin:routing_backend_changelist")
    for action in ("disable", "enable", "drain_selected", "undrain_selected", "enable"):  # the last one is a no-op
        admin_client.post(url, {"action": action, "_selected_action": [dev_backend.pk]})
    for _ in range(3):
        circuit.record("dev", ok=False, config=CircuitConfig(failures=3, cooldown_s=600), error="HTTP 503")
    admin_client.post(url, {"action": "close_circuit", "_selected_action": [dev_backend.pk]})
    assert circuit.status("dev").state == "closed"

    log = entries(target_id=str(dev_backend.pk))
    assert [(e.action, e.changes) for e in log] == [
        ("disable", {"enabled": [True, False]}),
        ("enable", {"enabled": [False, True]}),
        ("drain", {"drain": [False, True]}),
        ("undrain", {"drain": [True, False]}),
        ("close_circuit", {"circuit": ["open", "closed"]}),
    ]
    assert {(e.user, e.source, e.target_name) for e in log} == {(staff, "admin", "dev")}


def test_probe_and_multimodal_from_server_are_logged_without_the_servers_answer(admin_client, staff):
    with OllamaFake() as fake:
        backend = Backend.objects.create(name="ol", kind=BackendKind.OLLAMA, base_url=fake.url, model="llava")
        url = reverse("admin:routing_backend_changelist")
        admin_client.post(url, {"action": "probe_now", "_selected_action": [backend.pk]})
        admin_client.post(url, {"action": "multimodal_from_server", "_selected_action": [backend.pk]})

    probe, multimodal = entries(target_id=str(backend.pk))
    assert (probe.action, probe.user, probe.changes) == ("probe", staff, {})
    assert probe.detail.startswith("ok in ") and probe.detail.endswith(" ms")
    assert (multimodal.action, multimodal.changes) == ("set_multimodal", {"supports_multimodal": [False, True]})


def test_admin_job_cancel_and_retry_are_logged(admin_client, staff, dev_backend):
    queued = make_job(dev_backend)
    failed = make_job(dev_backend, state=JobState.FAILED, error="boom")
    done = make_job(dev_backend, state=JobState.SUCCEEDED)
    url = reverse("admin:jobs_job_changelist")
    admin_client.post(url, {"action": "cancel_jobs", "_selected_action": [queued.pk, done.pk]})
    admin_client.post(url, {"action": "retry_jobs", "_selected_action": [failed.pk, done.pk]})

    log = entries(target_type="jobs.job")
    assert [(e.action, e.target_id, e.changes) for e in log] == [
        ("cancel", str(queued.pk), {"state": ["queued", "canceled"]}),
        ("retry", str(failed.pk), {"state": ["failed", "queued"]}),
    ]
    assert {(e.user, e.source) for e in log} == {(staff, "admin")}


def test_the_audit_log_is_read_only_and_searchable_in_the_admin(admin_client, dev_backend):
    changelist = reverse("admin:routing_backend_changelist")
    admin_client.post(changelist, {"action": "disable", "_selected_action": [dev_backend.pk]})
    entry = AuditEntry.objects.get()

    log = reverse("admin:audit_auditentry_changelist")
    listing = admin_client.get(log, {"action": "disable", "target_type": "routing.backend", "q": "dev"})
    assert listing.status_code == 200 and b"enabled: true" in listing.content
    assert b"dev" in admin_client.get(log, {"q": "dev"}).content
    assert list(admin_client.get(log, {"q": "nothing-like-it"}).context["cl"].result_list) == []
    assert admin_client.get(reverse("admin:audit_auditentry_add")).status_code == 403
    detail = admin_client.get(reverse("admin:audit_auditentry_change", args=[entry.pk]))
    assert detail.status_code == 200 and b'name="_save"' not in detail.content
    r = admin_client.post(reverse("admin:audit_auditentry_delete", args=[entry.pk]), {"post": "yes"})
    assert r.status_code == 403 and AuditEntry.objects.filter(pk=entry.pk).exists()


def test_the_active_policy_cannot_be_deleted_from_its_admin_page(admin_client, policy):
    r = admin_client.post(reverse("admin:routing_routingpolicy_delete", args=[policy.pk]), {"post": "yes"}, follow=True)
    assert [str(m) for m in r.context["messages"]] == [
        "The active policy 'default' cannot be deleted; activate another policy first."
    ]
    assert RoutingPolicy.objects.filter(pk=policy.pk, is_active=True).exists()
    assert not PolicyChange.objects.filter(action="delete").exists()


def test_the_active_policy_cannot_be_deleted_through_the_api(staff_api, policy):
    r = staff_api.delete(f"/policies/{policy.pk}")
    assert r.status_code == 409 and "active policy" in r.json()["detail"]
    assert RoutingPolicy.objects.filter(pk=policy.pk, is_active=True).exists()
    assert not PolicyChange.objects.filter(action="delete").exists()


def test_credentials_in_a_base_url_never_reach_the_log(staff_api):
    """Rows from before base_url refused credentials may still hold some; the log masks them."""
    old = Backend.objects.create(name="old", kind=BackendKind.OLLAMA, base_url="http://ops:hunter2@gpu-1:11434")
    assert staff_api.delete(f"/backends/{old.pk}").status_code == 204
    (entry,) = entries(target_type="routing.backend")
    assert entry.changes["base_url"] == ["http://***@gpu-1:11434", None]
    assert "hunter2" not in the_whole_log()
