"""Least privilege in the admin: staff alone runs nothing; each action needs the model's change
permission, is not offered without it, and a forged POST of it is refused with nothing changed."""

from __future__ import annotations

import django_rq
import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django_rq.settings import get_queues_list

from audit.models import AuditEntry
from jobs import fair_queue
from jobs.models import Job, JobState
from routing import circuit
from routing.circuit import CircuitConfig
from routing.models import Backend, BackendKind, PolicyChange, RoutingPolicy
from tests.factories import make_job

pytestmark = pytest.mark.django_db(transaction=True)

VIEW = ["view_backend", "view_routingpolicy", "view_job", "view_auditentry", "view_policychange"]
CHANGE = ["change_backend", "change_routingpolicy", "change_job"]

BACKEND_ACTIONS = [
    "enable",
    "disable",
    "drain_selected",
    "undrain_selected",
    "close_circuit",
    "probe_now",
    "multimodal_from_server",
]


def open_circuit(name: str) -> None:
    """Three failed calls with a long cool-down: the circuit is open and stays so for the test."""
    config = CircuitConfig(failures=3, cooldown_s=600)
    for _ in range(3):
        circuit.record(name, ok=False, config=config, error="HTTP 503")
    assert circuit.status(name).state == "open"


def staff_with(django_user_model, username: str, codenames: list[str]):
    user = django_user_model.objects.create_user(username, password=f"pw-{username}-123", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


@pytest.fixture
def viewer(django_user_model):
    """Staff who may look at everything and change nothing."""
    return staff_with(django_user_model, "viewer", VIEW)


@pytest.fixture
def operator(django_user_model):
    """Staff with the change permissions (but no add/delete)."""
    return staff_with(django_user_model, "operator", VIEW + CHANGE)


def post_action(client, changelist: str, action: str, rows):
    """The changelist form as the browser posts it (action select + ticked rows + Go)."""
    return client.post(
        reverse(changelist),
        {"action": action, "select_across": "0", "index": "0", "_selected_action": [str(o.pk) for o in rows]},
    )


def offered_actions(client, changelist: str) -> set[str]:
    response = client.get(reverse(changelist))
    assert response.status_code == 200
    form = response.context["action_form"]
    return {value for value, _ in form.fields["action"].choices if value} if form is not None else set()


def test_view_only_staff_are_offered_no_actions(client, viewer, dev_backend, policy):
    make_job(dev_backend)
    client.force_login(viewer)
    for changelist in (
        "admin:routing_backend_changelist",
        "admin:routing_routingpolicy_changelist",
        "admin:jobs_job_changelist",
    ):
        assert offered_actions(client, changelist) == set(), changelist


def test_the_change_permission_offers_the_actions(client, operator, dev_backend, policy):
    make_job(dev_backend)
    client.force_login(operator)
    assert offered_actions(client, "admin:routing_backend_changelist") == set(BACKEND_ACTIONS)
    assert offered_actions(client, "admin:routing_routingpolicy_changelist") == {"activate_selected"}
    assert offered_actions(client, "admin:jobs_job_changelist") == {"cancel_jobs", "retry_jobs"}


@pytest.mark.parametrize("action", BACKEND_ACTIONS)
def test_a_forged_backend_action_from_view_only_staff_is_403_and_changes_nothing(client, viewer, action):
    a = Backend.objects.create(name="a", kind=BackendKind.DEV, enabled=True, drain=False)
    b = Backend.objects.create(name="b", kind=BackendKind.DEV, enabled=False, drain=True)
    open_circuit("a")
    rows_before = list(Backend.objects.order_by("name").values())
    client.force_login(viewer)

    response = post_action(client, "admin:routing_backend_changelist", action, [a, b])

    assert response.status_code == 403
    assert list(Backend.objects.order_by("name").values()) == rows_before
    assert circuit.status("a").state == "open"
    assert not AuditEntry.objects.exists()


def test_forged_job_actions_from_view_only_staff_are_403_and_change_nothing(client, viewer, dev_backend):
    queued = make_job(dev_backend)
    failed = make_job(dev_backend, state=JobState.FAILED, error="boom")
    client.force_login(viewer)

    assert post_action(client, "admin:jobs_job_changelist", "cancel_jobs", [queued]).status_code == 403
    assert post_action(client, "admin:jobs_job_changelist", "retry_jobs", [failed]).status_code == 403

    assert Job.objects.get(pk=queued.pk).state == JobState.QUEUED
    assert Job.objects.get(pk=failed.pk).state == JobState.FAILED
    assert len(fair_queue.waiting_ids("normal")) == 0
    assert not AuditEntry.objects.exists()


def test_view_only_staff_cannot_activate_a_policy_by_any_path(client, viewer, policy):
    other = RoutingPolicy.objects.create(name="other", strategy="least_busy")
    entries = PolicyChange.objects.count()
    client.force_login(viewer)

    forged = post_action(client, "admin:routing_routingpolicy_changelist", "activate_selected", [other])
    assert forged.status_code == 403
    activate = reverse("admin:routing_routingpolicy_activate", args=[other.pk])
    assert client.get(activate).status_code == 403
    shown = f"{other.pk}v{other.version}:{policy.pk}v{policy.version}"
    assert client.post(activate, {"confirm": "1", "shown": shown}).status_code == 403

    assert list(RoutingPolicy.objects.filter(is_active=True).values_list("name", flat=True)) == ["default"]
    assert PolicyChange.objects.count() == entries
    # Looking is allowed: the dry run is read-only.
    assert client.get(reverse("admin:routing_routingpolicy_simulate", args=[other.pk])).status_code == 200


def test_view_only_staff_cannot_save_or_delete_through_the_forms(client, viewer, dev_backend, policy):
    client.force_login(viewer)
    change = reverse("admin:routing_backend_change", args=[dev_backend.pk])
    response = client.post(change, {"name": "dev", "kind": "dev", "enabled": "", "max_context_tokens": 1})
    assert response.status_code == 403
    delete = reverse("admin:routing_backend_delete", args=[dev_backend.pk])
    assert client.post(delete, {"post": "yes"}).status_code == 403
    assert Backend.objects.get(pk=dev_backend.pk).enabled is True
    assert not AuditEntry.objects.exists()


def test_the_change_permission_runs_backend_and_job_actions(client, operator, dev_backend):
    queued = make_job(dev_backend)
    client.force_login(operator)

    assert post_action(client, "admin:routing_backend_changelist", "disable", [dev_backend]).status_code == 302
    assert post_action(client, "admin:jobs_job_changelist", "cancel_jobs", [queued]).status_code == 302

    assert Backend.objects.get(pk=dev_backend.pk).enabled is False
    assert Job.objects.get(pk=queued.pk).state == JobState.CANCELED


def test_django_rq_queue_pages_need_the_change_permission_to_empty_a_queue(client, viewer, operator, dev_backend):
    queue = django_rq.get_queue(get_queues_list()[0]["name"])
    queue.enqueue_call("jobs.nonexistent.task", args=["x"])
    empty = reverse("admin:django_rq_clear", args=[0])
    client.force_login(viewer)
    assert client.get(reverse("admin:django_rq_home")).status_code == 200  # looking is fine
    assert client.post(empty, {"post": "yes"}).status_code == 403
    assert queue.count == 1

    client.force_login(operator)
    assert client.post(empty, {"post": "yes"}).status_code == 302
    assert queue.count == 0
