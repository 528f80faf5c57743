"""Failure handling inside one job run, through real `manage.py rqworker` processes and real fake servers:
retries with backoff that honour Retry-After, fallback to the next ranked backend, permanent errors,
the whole-job deadline, and draining a backend."""

from __future__ import annotations

import pytest

from jobs.models import AttemptOutcome, Job, JobState
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import run_worker_burst
from tests.fakes.openai_server import OpenAIFake

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

FAST_RETRY = {"retry_base_ms": 1, "retry_cap_ms": 5, "circuit_failures": 100}


def openai_backend(name: str, fake: OpenAIFake, **config) -> Backend:
    return Backend.objects.create(
        name=name, kind=BackendKind.OPENAI, base_url=fake.base_url, model="gpt-test", config={**FAST_RETRY, **config}
    )


def use_order(*names: str) -> None:
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": list(names)}))


def submit(api, **body) -> str:
    body.setdefault("prompt", "hello world")
    r = api.post("/jobs", body, format="json")
    assert r.status_code == 202, r.content
    return r.json()["id"]


def attempts(job: Job) -> list[tuple[int, str, str]]:
    return [(a.number, a.backend_name, a.outcome) for a in job.attempts.order_by("number")]


def test_429_with_retry_after_is_retried_on_the_same_backend_after_the_wait(api):
    with OpenAIFake(fail_first=1, fail_status=429, retry_after="0.4") as fake:
        openai_backend("a", fake)
        use_order("a")
        job_id = submit(api)
        run_worker_burst()
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.output == "hello world" and job.attempt_count == 2
    assert attempts(job) == [(1, "a", AttemptOutcome.FAILED), (2, "a", AttemptOutcome.SUCCEEDED)]
    first, second = job.attempts.order_by("number")
    assert "Rate limit reached" in first.error and "HTTP 429" in first.error
    # Backoff alone would be ~1 ms here: the wait came from the server's Retry-After.
    assert (second.started_at - first.started_at).total_seconds() >= 0.4
    assert fake.generation_calls == 2


def test_503_everywhere_on_a_falls_back_to_b_and_records_every_attempt(api):
    with OpenAIFake(fail_rate=1.0, fail_status=503) as fake_a, OpenAIFake() as fake_b:
        openai_backend("a", fake_a, retry_max=2)
        b = openai_backend("b", fake_b)
        use_order("a", "b")
        job_id = submit(api, prompt="fall back please")
        run_worker_burst()
        assert (fake_a.generation_calls, fake_b.generation_calls) == (3, 1)
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.output == "fall back please"
    assert (job.backend, job.backend_name, job.attempt_count) == (b, "b", 4)
    assert job.routing["backend"] == "a"  # the decision stays as routing made it
    assert attempts(job) == [
        (1, "a", AttemptOutcome.FAILED),
        (2, "a", AttemptOutcome.FAILED),
        (3, "a", AttemptOutcome.FAILED),
        (4, "b", AttemptOutcome.SUCCEEDED),
    ]
    for attempt in job.attempts.filter(backend_name="a"):
        assert attempt.error.startswith("a: The engine is currently overloaded") and "HTTP 503" in attempt.error
        assert attempt.latency_ms is not None and attempt.finished_at
    assert job.attempts.get(backend_name="b").error == ""
    doc = api.get(f"/jobs/{job_id}").json()
    assert doc["state"] == "succeeded" and doc["backend"] == "b"


def test_model_not_found_fails_at_once_without_retry_or_fallback(api):
    with OpenAIFake() as fake_a, OpenAIFake() as fake_b:
        Backend.objects.create(
            name="a", kind=BackendKind.OPENAI, base_url=fake_a.base_url, model="no-such-model", config=FAST_RETRY
        )
        openai_backend("b", fake_b)
        use_order("a", "b")
        job_id = submit(api)
        run_worker_burst()
        assert (fake_a.generation_calls, fake_b.generation_calls) == (1, 0)
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.FAILED
    assert job.error == "a: The model `no-such-model` does not exist. (HTTP 404)"
    assert attempts(job) == [(1, "a", AttemptOutcome.FAILED)]


def test_the_deadline_caps_all_attempts_and_sleeps_together(api):
    # Each call fails at once and the budget allows 1,000 retries (over a minute of backoff): the
    # 2 s deadline, which counts the calls and the sleeps between them, ends the run long before.
    with OpenAIFake(fail_rate=1.0, fail_status=500) as fake:
        openai_backend("a", fake, retry_max=1000, retry_base_ms=50, retry_cap_ms=100, circuit_min_calls=100_000)
        use_order("a")
        job_id = submit(api, timeout_s=2)
        run_worker_burst()
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.FAILED
    n = job.attempt_count
    assert 1 <= n < 1001 and fake.generation_calls == n  # the budget did not end it
    assert job.error.startswith(f"deadline exceeded after {n} attempt")
    assert "(timeout_s=2); last error: a: " in job.error
    # Far below the budget's minute; how close to the 2 s the run ends is measured in bench/deadlines.py.
    assert (job.finished_at - job.started_at).total_seconds() < 20
    assert job.attempts.count() == n
    assert set(job.attempts.values_list("outcome", flat=True)) == {AttemptOutcome.FAILED}


def test_a_retry_after_beyond_the_deadline_falls_back_instead_of_sleeping(api):
    with OpenAIFake(fail_rate=1.0, fail_status=429, retry_after="3600") as fake_a, OpenAIFake() as fake_b:
        openai_backend("a", fake_a)
        openai_backend("b", fake_b)
        use_order("a", "b")
        job_id = submit(api, timeout_s=60)
        run_worker_burst()
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    # It fell back at once: it neither slept for the Retry-After nor waited out its deadline first.
    assert (job.finished_at - job.started_at).total_seconds() < 30
    assert attempts(job) == [(1, "a", AttemptOutcome.FAILED), (2, "b", AttemptOutcome.SUCCEEDED)]


def test_a_drained_backend_gets_no_new_jobs_but_runs_the_ones_already_queued(api, admin_client):
    a = Backend.objects.create(name="a", kind=BackendKind.DEV)
    Backend.objects.create(name="b", kind=BackendKind.DEV)
    use_order("a", "b")
    queued_before = submit(api, prompt="already queued")

    r = admin_client.post(
        "/admin/routing/backend/", {"action": "drain_selected", "_selected_action": [a.pk]}, follow=True
    )
    assert r.status_code == 200 and "Draining 1 backend" in r.content.decode()
    a.refresh_from_db()
    assert a.drain

    after = submit(api, prompt="new job")
    job = Job.objects.get(pk=after)
    assert job.backend_name == "b" and job.routing["rejected"] == {"a": "draining"}
    pinned = api.post("/jobs", {"prompt": "x", "backend": "a"}, format="json")
    assert pinned.status_code == 422 and "draining" in pinned.content.decode()

    run_worker_burst()
    first = Job.objects.get(pk=queued_before)
    assert (first.state, first.backend_name) == (JobState.SUCCEEDED, "a")
    assert Job.objects.get(pk=after).state == JobState.SUCCEEDED

    admin_client.post("/admin/routing/backend/", {"action": "undrain_selected", "_selected_action": [a.pk]})
    assert Job.objects.get(pk=submit(api)).backend_name == "a"


def test_fallback_skips_drained_and_disabled_backends(api):
    with OpenAIFake(fail_rate=1.0, fail_status=502) as fake_a:
        openai_backend("a", fake_a, retry_max=0)
        Backend.objects.create(name="b", kind=BackendKind.DEV)
        Backend.objects.create(name="c", kind=BackendKind.DEV)
        Backend.objects.create(name="d", kind=BackendKind.DEV)
        use_order("a", "b", "c", "d")
        job_id = submit(api)
        assert [c["backend"] for c in Job.objects.get(pk=job_id).routing["candidates"]] == ["a", "b", "c", "d"]
        # After routing, an operator drains b and disables c: the run must reread the registry.
        Backend.objects.filter(name="b").update(drain=True)
        Backend.objects.filter(name="c").update(enabled=False)
        run_worker_burst()
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.SUCCEEDED, job.error
    assert attempts(job) == [(1, "a", AttemptOutcome.FAILED), (2, "d", AttemptOutcome.SUCCEEDED)]


def test_when_every_candidate_fails_the_error_names_the_attempts(api):
    Backend.objects.create(name="a", kind=BackendKind.DEV, config={**FAST_RETRY, "fail_rate": 1.0, "retry_max": 1})
    Backend.objects.create(name="b", kind=BackendKind.DEV, config={**FAST_RETRY, "fail_rate": 1.0, "retry_max": 0})
    use_order("a", "b")
    job_id = submit(api)
    run_worker_burst()
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.FAILED
    assert job.error.startswith("b: dev backend injected failure (HTTP 503)")
    assert job.error.endswith("(gave up after 3 attempts on a, b)")
    assert attempts(job) == [(1, "a", "failed"), (2, "a", "failed"), (3, "b", "failed")]
    assert [a.error.split(":")[0] for a in job.attempts.order_by("number")] == ["a", "a", "b"]
