"""A job's change page tells its story: created → routed (policy, candidates) → each attempt → final state."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from jobs import queueing
from jobs.models import Job, JobState
from routing.models import Backend, BackendKind
from tests.factories import make_job

pytestmark = pytest.mark.django_db(transaction=True)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def routed_job(backend: Backend, **fields) -> Job:
    """A job with the routing decision stored the way routing.services.Decision.as_json writes it."""
    routing = {
        "policy": "cheap",
        "policy_version": 7,
        "backend": backend.name,
        "reason": "cheapest eligible: 0.0010/1k",
        "candidates": [
            {"backend": backend.name, "score": 0.001, "reason": "cost 0.0010/1k"},
            {"backend": "spare", "score": 0.0125, "reason": "cost 0.0125/1k"},
        ],
        "rejected": {"vision-box": "circuit open"},
        "job": {"priority": "normal", "prompt_tokens": 3},
    }
    return make_job(backend, policy_name="cheap", policy_version=7, routing=routing, **fields)


def change_page(admin_client, job: Job) -> str:
    r = admin_client.get(reverse("admin:jobs_job_change", args=[job.pk]))
    assert r.status_code == 200
    return r.content.decode()


def test_timeline_shows_routing_each_attempt_and_the_result(admin_client, dev_backend):
    Backend.objects.create(name="spare", kind=BackendKind.DEV)
    job = routed_job(dev_backend)
    queueing.enqueue(job, meta={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
    job.mark_running("worker-a")
    job.mark_failed("connection refused by dev", latency_ms=12)
    job.requeue()  # the operator's retry: a second attempt, the first one kept
    job.mark_running("worker-b")
    job.mark_succeeded(
        output="forty-two", finish_reason="stop", prompt_tokens=11, completion_tokens=5, latency_ms=34,
        cost=Decimal("0.00012300"),
    )  # fmt: skip

    html = change_page(admin_client, job)
    timeline = html[html.index('id="job-timeline"') : html.index("</fieldset>", html.index('id="job-timeline"'))]
    # created → routed → attempt 1 → attempt 2 → final, in that order
    order = [timeline.index(f'id="tl-{step}"') for step in ("created", "routed", "attempt-1", "attempt-2", "final")]
    assert order == sorted(order)
    assert "Routed to dev by policy cheap (version 7)" in timeline
    assert "cheapest eligible: 0.0010/1k" in timeline
    assert "spare" in timeline and "0.0125" in timeline and "cost 0.0125/1k" in timeline  # the runner-up
    assert "vision-box: circuit open" in timeline  # not eligible, and why
    attempt1 = timeline[timeline.index('id="tl-attempt-1"') : timeline.index('id="tl-attempt-2"')]
    assert "Attempt 1 on dev: failed" in attempt1
    assert "worker-a" in attempt1 and "12 ms" in attempt1 and "connection refused by dev" in attempt1
    attempt2 = timeline[timeline.index('id="tl-attempt-2"') : timeline.index('id="tl-final"')]
    assert "Attempt 2 on dev: succeeded" in attempt2 and "worker-b" in attempt2 and "34 ms" in attempt2
    final = timeline[timeline.index('id="tl-final"') :]
    assert "Succeeded on dev" in final and "forty-two" in final
    assert "11 prompt + 5 completion = 16 tokens" in final
    assert "0.000123" in final
    assert TRACE_ID in final
    # the existing page stays: attempts inline and the read-only field sets
    assert "Job attempts" in html and "Request" in html


def test_timeline_of_a_queued_job_and_of_one_without_a_decision(admin_client, dev_backend):
    waiting = routed_job(dev_backend)
    html = change_page(admin_client, waiting)
    final = html[html.index('id="tl-final"') :]
    assert "Queued" in final and 'id="tl-attempt-1"' not in html
    assert "—" in final  # no trace id: tracing was off when it was submitted

    legacy = make_job(dev_backend, routing={}, policy_name="")
    legacy.mark_running("w")
    legacy.mark_failed("boom")
    html = change_page(admin_client, legacy)
    assert "No routing decision recorded" in html
    assert "Failed on dev" in html and "tracing was off" in html


def test_user_data_in_the_timeline_is_escaped(admin_client, dev_backend):
    job = routed_job(dev_backend, prompt="<script>alert('prompt')</script>")
    job.routing["candidates"][0]["reason"] = "<b>bold reason</b>"
    Job.objects.filter(pk=job.pk).update(routing=job.routing)
    job.mark_running("<i>worker</i>")
    job.mark_failed("<img src=x onerror=alert('error')>")
    job.requeue()
    job.mark_running("w2")
    job.mark_succeeded(
        output="<iframe src=javascript:alert('out')></iframe>", finish_reason="stop", prompt_tokens=1,
        completion_tokens=1, latency_ms=1, cost=None,
    )  # fmt: skip

    html = change_page(admin_client, job)
    for raw in (
        "<script>alert('prompt')</script>",
        "<b>bold reason</b>",
        "<i>worker</i>",
        "<img src=x onerror=alert('error')>",
        "<iframe src=javascript:alert('out')></iframe>",
    ):
        assert raw not in html
    timeline = html[html.index('id="job-timeline"') :]
    assert "&lt;script&gt;alert(&#x27;prompt&#x27;)&lt;/script&gt;" in timeline
    assert "&lt;b&gt;bold reason&lt;/b&gt;" in timeline
    assert "&lt;img src=x onerror=alert(&#x27;error&#x27;)&gt;" in timeline
    assert "&lt;iframe src=javascript:alert(&#x27;out&#x27;)&gt;&lt;/iframe&gt;" in timeline
    assert job.state == JobState.SUCCEEDED


def test_the_job_page_offers_no_save_buttons(admin_client, dev_backend):
    """Every field is read-only: a job changes only through its actions."""
    html = change_page(admin_client, routed_job(dev_backend))
    assert 'name="_save"' not in html and 'name="_continue"' not in html and 'name="_addanother"' not in html
