"""The routing admin as an operator uses it: live figures, activation with a confirmation page,
the audit log, and the read-only dry run of a policy over recent jobs."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from jobs.models import Job, JobState
from orchestrator_site.redis import redis_client
from routing import capacity, policies, stats
from routing.models import Backend, BackendKind, PolicyChange, RoutingPolicy
from tests.factories import make_job

pytestmark = pytest.mark.django_db(transaction=True)


# --- live figures ------------------------------------------------------------------------------------
def test_backend_list_and_page_show_the_live_figures(admin_client, dev_backend):
    for ms in (100, 200, 300):
        stats.record_call("dev", latency_ms=ms, ok=True)
    stats.record_call("dev", latency_ms=5, ok=False, error="connection refused")
    redis_client().hset("llmo:circuit:dev", "state", "half_open")
    with capacity.slot("dev", 16):
        listing = admin_client.get(reverse("admin:routing_backend_changelist")).content.decode()
        page = admin_client.get(reverse("admin:routing_backend_change", args=[dev_backend.pk])).content.decode()
    for html in (listing, page):
        assert "half_open" in html
        assert "connection refused" in html
        assert "25.0%" in html  # 1 error in 4 calls
        assert "300" in html  # p95
    assert "1/16" in listing
    assert "1 of max 16" in page


def test_backend_pages_work_before_any_worker_reported(admin_client, dev_backend):
    assert admin_client.get(reverse("admin:routing_backend_changelist")).status_code == 200
    page = admin_client.get(reverse("admin:routing_backend_change", args=[dev_backend.pk])).content.decode()
    assert "no calls yet" in page and "closed" in page
    assert admin_client.get(reverse("admin:routing_backend_add")).status_code == 200


# --- activation ------------------------------------------------------------------------------------
def confirm(admin_client, url: str, **extra):
    """Post the confirmation form as shown: the operator's "Yes, activate" with the page's token."""
    shown = admin_client.get(url).context["shown"]
    return admin_client.post(url, {"confirm": "Yes", "shown": shown, **extra}, follow=True)


def test_activation_shows_what_changes_then_activates(admin_client, policy, staff):
    other = RoutingPolicy.objects.create(name="cheap", strategy="cheapest", params={"max_p95_ms": 800})
    change = admin_client.get(reverse("admin:routing_routingpolicy_change", args=[other.pk])).content.decode()
    url = reverse("admin:routing_routingpolicy_activate", args=[other.pk])
    assert url in change  # the change-form button

    page = admin_client.get(url)
    html = page.content.decode()
    assert page.status_code == 200
    assert "instead of" in html and "default (version" in html
    assert "ordered" in html and "cheapest" in html  # strategy: from → to
    assert "max_p95_ms" in html
    assert "Dry run" in html and "No finished jobs to replay yet" in html
    assert RoutingPolicy.objects.get(is_active=True) == policy  # GET changes nothing
    admin_client.post(url)  # a POST without the confirm button changes nothing either
    assert RoutingPolicy.objects.get(is_active=True) == policy

    done = confirm(admin_client, url)
    assert RoutingPolicy.objects.get(is_active=True) == other
    entry = PolicyChange.objects.filter(action="activate").first()
    assert (entry.policy, entry.user, entry.source) == (other, staff, "admin")
    assert (entry.before["name"], entry.after["name"]) == ("default", "cheap")
    [message] = [m for m in done.context["messages"]]
    assert message.level_tag == "success"
    assert f"Policy <strong>cheap</strong> is now active (version {entry.version})" in str(message)
    entry_url = reverse("admin:routing_policychange_change", args=[entry.pk])
    assert f'<a href="{entry_url}">' in done.content.decode()  # the success message links the audit entry
    assert admin_client.get(entry_url).status_code == 200


def test_confirmation_shows_the_dry_run_and_activates_nothing_until_confirmed(admin_client, policy, dev_backend):
    Backend.objects.create(name="budget", kind=BackendKind.DEV, cost_input_per_1k=Decimal("0.001"))
    dev_backend.cost_input_per_1k = Decimal("0.01")
    dev_backend.save()
    moved = [finished(dev_backend, cost="0.01", latency_ms=100) for _ in range(3)]
    finished(dev_backend, cost="0.01", latency_ms=100, requested_backend="dev")  # pinned: stays
    cheap = RoutingPolicy.objects.create(name="cheap", strategy="cheapest")
    url = reverse("admin:routing_routingpolicy_activate", args=[cheap.pk])

    page = admin_client.get(url)
    html = page.content.decode()
    assert page.context["sim"].totals["changed"] == 3
    assert "3 of 4 jobs would go to a different backend" in html
    shares = html[html.index('id="dry-run-shares"') :]
    assert "budget" in shares and "75.0%" in shares
    moved_rows = html[html.index('id="dry-run-changed"') :]
    assert all(str(j.pk)[:12] in moved_rows for j in moved)
    assert RoutingPolicy.objects.get(is_active=True) == policy
    assert not PolicyChange.objects.filter(action="activate", policy=cheap).exists()

    confirm(admin_client, url)
    assert RoutingPolicy.objects.get(is_active=True) == cheap
    assert PolicyChange.objects.filter(action="activate", policy=cheap, source="admin").count() == 1


def test_a_stale_confirmation_is_shown_again_not_applied(admin_client, policy):
    cheap = RoutingPolicy.objects.create(name="cheap", strategy="cheapest")
    url = reverse("admin:routing_routingpolicy_activate", args=[cheap.pk])
    shown = admin_client.get(url).context["shown"]
    third = RoutingPolicy.objects.create(name="third", strategy="ordered")
    policies.activate(third)  # someone else switched meanwhile: the page compared against `default`

    r = admin_client.post(url, {"confirm": "Yes", "shown": shown})
    assert r.status_code == 200 and "instead of" in r.content.decode()
    assert "nothing was activated" in " ".join(str(m) for m in r.context["messages"])
    assert RoutingPolicy.objects.get(is_active=True) == third


def test_activation_page_needs_staff_and_a_real_policy(admin_client, user, policy):
    other = RoutingPolicy.objects.create(name="other", strategy="ordered")
    assert admin_client.get(reverse("admin:routing_routingpolicy_activate", args=[9999])).status_code == 404
    admin_client.force_login(user)  # not staff
    r = admin_client.post(reverse("admin:routing_routingpolicy_activate", args=[other.pk]), {"confirm": "Yes"})
    assert r.status_code == 302 and "/admin/login/" in r["Location"]
    assert RoutingPolicy.objects.get(is_active=True) == policy


def test_list_action_goes_through_the_confirmation_page(admin_client, policy):
    other = RoutingPolicy.objects.create(name="other", strategy="ordered", params={"order": []})
    r = admin_client.post(
        reverse("admin:routing_routingpolicy_changelist"),
        {"action": "activate_selected", "_selected_action": [other.pk]},
        follow=True,
    )
    url = reverse("admin:routing_routingpolicy_activate", args=[other.pk])
    assert r.redirect_chain == [(url, 302)]
    assert "Yes, activate other" in r.content.decode() and 'id="dry-run"' in r.content.decode()
    assert RoutingPolicy.objects.get(is_active=True) == policy  # not yet

    done = confirm(admin_client, url)
    assert b"is now active" in done.content
    assert RoutingPolicy.objects.get(is_active=True) == other
    assert PolicyChange.objects.filter(action="activate", policy=other, source="admin").exists()


def test_list_action_refuses_more_than_one_policy(admin_client, policy):
    a = RoutingPolicy.objects.create(name="a", strategy="ordered")
    b = RoutingPolicy.objects.create(name="b", strategy="ordered")
    r = admin_client.post(
        reverse("admin:routing_routingpolicy_changelist"),
        {"action": "activate_selected", "_selected_action": [a.pk, b.pk]},
        follow=True,
    )
    [message] = [str(m) for m in r.context["messages"]]
    assert "select exactly one" in message and "2 were selected" in message
    assert RoutingPolicy.objects.get(is_active=True) == policy
    assert not PolicyChange.objects.filter(action="activate", policy__in=[a, b]).exists()


# --- audit log -----------------------------------------------------------------------------------------
def test_admin_create_edit_delete_are_audited_and_the_log_is_read_only(admin_client, policy, staff):
    add = reverse("admin:routing_routingpolicy_add")
    r = admin_client.post(add, {"name": "fast", "strategy": "fastest", "params": "{}", "description": ""})
    assert r.status_code == 302
    fast = RoutingPolicy.objects.get(name="fast")
    r = admin_client.post(
        reverse("admin:routing_routingpolicy_change", args=[fast.pk]),
        {"name": "fast", "strategy": "fastest", "params": '{"latency": "p95"}', "description": ""},
    )
    assert r.status_code == 302
    admin_client.post(reverse("admin:routing_routingpolicy_delete", args=[fast.pk]), {"post": "yes"})
    assert not RoutingPolicy.objects.filter(name="fast").exists()

    log = list(PolicyChange.objects.filter(policy_name="fast").order_by("at", "id"))
    assert [e.action for e in log] == ["create", "update", "delete"]
    assert all(e.user == staff and e.source == "admin" for e in log)
    assert (log[1].before["params"], log[1].after["params"]) == ({}, {"latency": "p95"})
    assert log[1].version == 2

    listing = admin_client.get(reverse("admin:routing_policychange_changelist"))
    assert listing.status_code == 200 and b"latency" in listing.content
    assert admin_client.get(reverse("admin:routing_policychange_add")).status_code == 403
    detail = admin_client.get(reverse("admin:routing_policychange_change", args=[log[1].pk]))
    assert detail.status_code == 200 and b'name="_save"' not in detail.content
    r = admin_client.post(reverse("admin:routing_policychange_delete", args=[log[1].pk]), {"post": "yes"})
    assert r.status_code == 403 and PolicyChange.objects.filter(pk=log[1].pk).exists()


def test_the_active_policy_survives_bulk_delete(admin_client, policy):
    spare = RoutingPolicy.objects.create(name="spare", strategy="ordered")
    admin_client.post(
        reverse("admin:routing_routingpolicy_changelist"),
        {"action": "delete_selected", "_selected_action": [policy.pk, spare.pk], "post": "yes"},
    )
    assert list(RoutingPolicy.objects.values_list("name", flat=True)) == ["default"]
    assert PolicyChange.objects.filter(action="delete", policy_name="spare").exists()


# --- dry run -------------------------------------------------------------------------------------------
def finished(backend: Backend, *, cost: str, latency_ms: int, **fields) -> Job:
    return make_job(
        backend,
        state=JobState.SUCCEEDED,
        finished_at=timezone.now(),
        prompt_tokens=1000,
        completion_tokens=100,
        cost=Decimal(cost),
        latency_ms=latency_ms,
        **fields,
    )


def test_simulation_shows_shares_costs_and_the_jobs_that_would_move(admin_client, policy, dev_backend):
    dev_backend.cost_input_per_1k = Decimal("0.01")
    dev_backend.save()
    Backend.objects.create(name="budget", kind=BackendKind.DEV, cost_input_per_1k=Decimal("0.001"))
    Backend.objects.create(name="vision", kind=BackendKind.DEV, supports_multimodal=True,
                           cost_input_per_1k=Decimal("0.005"))  # fmt: skip
    moved = [finished(dev_backend, cost="0.01", latency_ms=100) for _ in range(3)]
    stays = finished(dev_backend, cost="0.01", latency_ms=100, image_count=1)  # only vision can take it... now
    pinned = finished(dev_backend, cost="0.01", latency_ms=100, requested_backend="dev")
    make_job(dev_backend, state=JobState.QUEUED)  # not finished: not replayed
    cheap = RoutingPolicy.objects.create(name="cheap", strategy="cheapest")
    stats.record_call("budget", latency_ms=40, ok=True)
    rows_before = list(Job.objects.order_by("pk").values_list("pk", "updated_at", "backend_name"))
    audit_before = PolicyChange.objects.count()

    page = admin_client.get(reverse("admin:routing_routingpolicy_simulate", args=[cheap.pk]), {"n": 50})
    assert page.status_code == 200
    sim = page.context["sim"]
    assert sim.totals["jobs"] == 5
    assert {j.job_id: j.simulated for j in sim.jobs} == {
        **{str(j.pk): "budget" for j in moved},
        str(stays.pk): "vision",
        str(pinned.pk): "dev",
    }
    assert sorted(j.job_id for j in sim.changed) == sorted(str(j.pk) for j in [*moved, stays])
    shares = {s.backend: (s.actual, s.simulated) for s in sim.shares}
    assert shares == {"dev": (5, 1), "budget": (0, 3), "vision": (0, 1)}
    assert sim.totals["actual_cost"] == Decimal("0.05")
    assert sim.totals["est_cost"] < sim.totals["actual_cost"]
    html = page.content.decode()
    assert "Jobs that would change backend (4)" in html and "budget" in html and "60.0%" in html

    # read-only: no job, policy or audit row changed
    assert list(Job.objects.order_by("pk").values_list("pk", "updated_at", "backend_name")) == rows_before
    assert PolicyChange.objects.count() == audit_before
    assert RoutingPolicy.objects.get(is_active=True) == policy


def test_simulation_with_no_jobs_and_the_link_from_the_policy(admin_client, policy):
    url = reverse("admin:routing_routingpolicy_simulate", args=[policy.pk])
    assert url in admin_client.get(reverse("admin:routing_routingpolicy_change", args=[policy.pk])).content.decode()
    page = admin_client.get(url, {"n": "lots"})
    assert page.status_code == 200 and b"No finished jobs" in page.content


def test_simulating_weighted_is_stable_per_job(admin_client, policy, dev_backend):
    Backend.objects.create(name="other", kind=BackendKind.DEV)
    for _ in range(20):
        finished(dev_backend, cost="0", latency_ms=10)
    weighted = RoutingPolicy.objects.create(name="w", strategy="weighted")
    url = reverse("admin:routing_routingpolicy_simulate", args=[weighted.pk])
    first = {j.job_id: j.simulated for j in admin_client.get(url).context["sim"].jobs}
    again = {j.job_id: j.simulated for j in admin_client.get(url).context["sim"].jobs}
    assert first == again and set(first.values()) == {"dev", "other"}
