"""The admin: jobs, backends, policies and django-rq's queues, as an operator uses them."""

from __future__ import annotations

import pytest
from django.urls import reverse

from jobs import fair_queue
from jobs.models import Job, JobState
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.factories import make_job

pytestmark = pytest.mark.django_db(transaction=True)


def test_admin_needs_a_staff_login(client, user):
    assert client.get("/admin/").status_code == 302
    client.force_login(user)
    assert client.get("/admin/").status_code == 302  # logged in but not staff


def test_index_links_jobs_backends_policies_and_queues(admin_client):
    html = admin_client.get("/admin/").content.decode()
    for url in (
        "/admin/jobs/job/",
        "/admin/routing/backend/",
        "/admin/routing/routingpolicy/",
        "/admin/django_rq/dashboard/",
    ):
        assert url in html
    queues = admin_client.get("/admin/django_rq/dashboard/")
    assert queues.status_code == 200
    assert b"high" in queues.content and b"normal" in queues.content and b"low" in queues.content


def test_job_list_filters_search_and_detail(admin_client, dev_backend):
    done = make_job(dev_backend, prompt="find the needle")
    done.mark_running("w1")
    done.mark_succeeded(
        output="needle", finish_reason="stop", prompt_tokens=3, completion_tokens=1, latency_ms=4, cost=None
    )
    make_job(dev_backend, prompt="other")
    url = reverse("admin:jobs_job_changelist")
    assert admin_client.get(url, {"state": "succeeded"}).content.decode().count(str(done.pk)) >= 1
    assert str(done.pk) in admin_client.get(url, {"q": "needle"}).content.decode()
    assert str(done.pk) in admin_client.get(url, {"q": str(done.pk)}).content.decode()
    assert admin_client.get(url, {"created_at__year": done.created_at.year}).status_code == 200
    detail = admin_client.get(reverse("admin:jobs_job_change", args=[done.pk])).content.decode()
    assert "needle" in detail and "w1" in detail  # result and the attempt's worker


def test_cancel_action_cancels_only_active_jobs(admin_client, dev_backend):
    queued = make_job(dev_backend)
    finished = make_job(dev_backend, state=JobState.FAILED)
    r = admin_client.post(
        reverse("admin:jobs_job_changelist"),
        {"action": "cancel_jobs", "_selected_action": [queued.pk, finished.pk]},
        follow=True,
    )
    assert r.status_code == 200
    assert Job.objects.get(pk=queued.pk).state == JobState.CANCELED
    assert Job.objects.get(pk=finished.pk).state == JobState.FAILED


def test_retry_action_requeues_failed_job_onto_its_queue(admin_client, dev_backend):
    job = make_job(dev_backend)
    job.mark_running("w")
    job.mark_failed("boom")
    admin_client.post(reverse("admin:jobs_job_changelist"), {"action": "retry_jobs", "_selected_action": [job.pk]})
    job.refresh_from_db()
    assert job.state == JobState.QUEUED and job.error == ""
    assert str(job.pk).encode() in [i.encode() for i in fair_queue.waiting_ids("normal")]


def test_backend_api_key_is_never_shown(admin_client):
    backend = Backend.objects.create(
        name="cloud", kind=BackendKind.OPENAI, base_url="http://127.0.0.1:9/v1", api_key="sk-very-secret-value"
    )
    listing = admin_client.get(reverse("admin:routing_backend_changelist")).content.decode()
    form = admin_client.get(reverse("admin:routing_backend_change", args=[backend.pk])).content.decode()
    assert "sk-very-secret-value" not in listing and "sk-very-secret-value" not in form
    assert ">set<" in listing


def test_saving_a_backend_with_blank_key_keeps_the_stored_key(admin_client):
    backend = Backend.objects.create(
        name="cloud", kind=BackendKind.OPENAI, base_url="http://127.0.0.1:9/v1", api_key="sk-keep"
    )
    data = {
        "name": "cloud",
        "kind": "openai",
        "enabled": "on",
        "base_url": "http://127.0.0.1:9/v1",
        "model": "m",
        "api_key": "",
        "max_context_tokens": 8192,
        "max_concurrency": 4,
        "weight": 1,
        "timeout_s": 30,
        "cost_input_per_1k": "0",
        "cost_output_per_1k": "0",
        "config": "{}",
        "pool": "",
    }
    r = admin_client.post(reverse("admin:routing_backend_change", args=[backend.pk]), data)
    assert r.status_code == 302, r.content.decode()[:2000]
    backend.refresh_from_db()
    assert backend.api_key == "sk-keep" and backend.model == "m"
    admin_client.post(reverse("admin:routing_backend_change", args=[backend.pk]), {**data, "clear_api_key": "on"})
    backend.refresh_from_db()
    assert backend.api_key == ""


def test_activate_action_switches_the_active_policy_after_confirmation(admin_client, policy):
    other = RoutingPolicy.objects.create(name="other", strategy="ordered", params={"order": []})
    page = admin_client.post(
        reverse("admin:routing_routingpolicy_changelist"),
        {"action": "activate_selected", "_selected_action": [other.pk]},
        follow=True,
    )
    assert b"Yes, activate other" in page.content
    assert list(RoutingPolicy.objects.filter(is_active=True)) == [policy]
    url = reverse("admin:routing_routingpolicy_activate", args=[other.pk])
    r = admin_client.post(url, {"confirm": "Yes", "shown": page.context["shown"]}, follow=True)
    assert b"is now active" in r.content
    assert list(RoutingPolicy.objects.filter(is_active=True)) == [other]


def test_policy_form_rejects_unknown_strategy_and_bad_params(admin_client):
    url = reverse("admin:routing_routingpolicy_add")
    r = admin_client.post(url, {"name": "x", "strategy": "nope", "params": "{}", "description": ""})
    assert r.status_code == 200 and not RoutingPolicy.objects.filter(name="x").exists()
    r = admin_client.post(url, {"name": "x", "strategy": "ordered", "params": '{"order": "dev"}', "description": ""})
    assert r.status_code == 200 and b"order" in r.content and not RoutingPolicy.objects.filter(name="x").exists()


def test_probe_now_and_multimodal_from_server_ask_the_real_protocol(admin_client):
    from tests.fakes.ollama_server import OllamaFake

    with OllamaFake() as fake:
        backend = Backend.objects.create(name="ol", kind=BackendKind.OLLAMA, base_url=fake.url, model="llava")
        url = reverse("admin:routing_backend_changelist")
        r = admin_client.post(url, {"action": "probe_now", "_selected_action": [backend.pk]}, follow=True)
        text = " ".join(str(m) for m in r.context["messages"])
        assert "ol: ok in" in text and "vision" in text, text
        admin_client.post(url, {"action": "multimodal_from_server", "_selected_action": [backend.pk]})
    backend.refresh_from_db()
    assert backend.supports_multimodal is True
