"""/metrics: fleet figures that workers on any host write to Redis, read by the control plane.

Workers run as real processes (``manage.py rqworker --burst``) so the test proves the figures
cross process boundaries the way they cross hosts: only through Redis.
"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from jobs.models import Job, JobState
from orchestrator_site import metrics
from orchestrator_site.redis import redis_client
from routing import capacity, policies
from routing.models import Backend, BackendKind, RoutingPolicy
from routing.stats import circuit_key, record_call
from tests.conftest import run_worker_burst
from workers.runtime.threaded import ThreadedWorker

TOKEN = "test-metrics-token"
P = metrics.PREFIX


@pytest.fixture(autouse=True)
def metrics_token(settings):
    settings.METRICS_TOKEN = TOKEN


def scrape(scope: str = "all") -> dict[str, list]:
    """Parse the exposition with Prometheus's own parser (so a malformed line fails the test)."""
    r = Client().get(f"/metrics?scope={scope}", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert r.status_code == 200, r.content
    assert r["Content-Type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(r.content.decode()):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def value(samples: dict[str, list], metric: str, **labels: str) -> float:
    matching = [s.value for s in samples.get(metric, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert matching, f"no sample {metric}{labels}; have {[s.labels for s in samples.get(metric, [])]}"
    return sum(matching)


def submit(api, **body) -> str:
    body.setdefault("prompt", "hello metrics")
    r = api.post("/jobs", body, format="json")
    assert r.status_code == 202, r.content
    return r.json()["id"]


@pytest.mark.django_db(transaction=True)
def test_submission_counts_created_enqueued_and_routing_decision(api, policy):
    submit(api, priority="high")
    submit(api, priority="low")
    submit(api, priority="low")
    s = scrape("fleet")
    assert value(s, P + "jobs_created_total") == 3
    assert value(s, P + "jobs_enqueued_total", priority="low") == 2
    assert value(s, P + "jobs_enqueued_total", priority="high") == 1
    assert value(s, P + "routing_decisions_total", policy="default", backend="dev") == 3
    # queue depth is read at scrape time (every tenant's sub-queue), for every queue (empty ones too)
    assert value(s, P + "queue_depth", queue="low") == 2
    assert value(s, P + "queue_depth", queue="high") == 1
    assert value(s, P + "queue_depth", queue="normal") == 0
    # django-rq's own queue figures ride along; they count only RQ's own lists, which our jobs no longer use
    assert value(s, "rq_jobs", queue="low", status="queued") == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_worker_process_outcomes_reach_the_control_plane_through_redis(api, db):
    Backend.objects.create(
        name="priced",
        kind=BackendKind.DEV,
        config={"latency_ms": 30},
        cost_input_per_1k="1.0",
        cost_output_per_1k="2.0",
    )
    Backend.objects.create(name="broken", kind=BackendKind.DEV, config={"fail_rate": 1, "fail_status": 400})
    policies.activate(
        RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["priced", "broken"]})
    )
    ok_ids = [submit(api, prompt="one two three four", priority="normal") for _ in range(2)]
    bad_id = submit(api, prompt="x", backend="broken")

    run_worker_burst()  # another process: nothing but Redis carries its figures here

    assert {Job.objects.get(pk=i).state for i in ok_ids} == {JobState.SUCCEEDED}
    assert Job.objects.get(pk=bad_id).state == JobState.FAILED
    s = scrape("fleet")
    assert value(s, P + "jobs_finished_total", backend="priced", outcome="succeeded") == 2
    assert value(s, P + "jobs_finished_total", backend="broken", outcome="failed") == 1
    assert value(s, P + "backend_attempts_total", backend="priced", outcome="succeeded") == 2
    assert value(s, P + "backend_errors_total", backend="broken") == 1
    assert value(s, P + "job_latency_seconds_count", backend="priced", outcome="succeeded") == 2
    # 30 ms of backend time per job: nothing lands in the buckets below it, everything in +Inf
    assert value(s, P + "job_latency_seconds_bucket", backend="priced", outcome="succeeded", le="0.025") == 0
    assert value(s, P + "job_latency_seconds_bucket", backend="priced", outcome="succeeded", le="+Inf") == 2
    assert value(s, P + "job_latency_seconds_sum", backend="priced", outcome="succeeded") >= 0.06
    assert value(s, P + "job_execution_seconds_count", backend="broken", outcome="failed") == 1
    assert value(s, P + "job_queue_wait_seconds_count", queue="normal") == 3
    assert value(s, P + "backend_call_seconds_count", backend="priced", outcome="succeeded") == 2
    jobs = [Job.objects.get(pk=i) for i in ok_ids]
    prompt = sum(j.prompt_tokens for j in jobs)
    completion = sum(j.completion_tokens for j in jobs)
    assert value(s, P + "tokens_total", backend="priced", kind="prompt", tenant="-") == prompt
    assert value(s, P + "tokens_total", backend="priced", kind="completion", tenant="-") == completion
    assert value(s, P + "cost_total", backend="priced", tenant="-") == pytest.approx(float(sum(j.cost for j in jobs)))
    assert value(s, P + "queue_depth", queue="normal") == 0
    # Our task skips RQ's per-job registries (the Job row keeps all of it): nothing lingers in
    # RQ's, and the RQ job hashes are gone once the jobs ended.
    assert value(s, "rq_jobs", queue="normal", status="started") == 0
    assert value(s, "rq_jobs", queue="normal", status="queued") == 0
    assert not any(redis_client().exists(f"rq:job:{i}") for i in [*ok_ids, bad_id])


@pytest.mark.django_db
def test_backend_health_gauges_read_live_figures(dev_backend):
    Backend.objects.create(name="off", kind=BackendKind.DEV, enabled=False)
    record_call("dev", latency_ms=120.0, ok=True)
    record_call("dev", latency_ms=80.0, ok=False, error="boom")
    redis_client().hset(circuit_key("dev"), "state", "open")
    with capacity.slot("dev", 16):
        s = scrape("fleet")
    assert value(s, P + "backend_in_flight", backend="dev") == 1
    assert value(s, P + "backend_error_rate", backend="dev") == 0.5
    assert value(s, P + "backend_latency_ewma_seconds", backend="dev") == pytest.approx(0.12)
    assert value(s, P + "backend_circuit_state", backend="dev", state="open") == 1
    assert value(s, P + "backend_circuit_state", backend="dev", state="closed") == 0
    assert value(s, P + "backend_enabled", backend="dev") == 1
    assert value(s, P + "backend_enabled", backend="off") == 0


@pytest.mark.django_db
def test_histogram_buckets_are_cumulative_and_exact():
    pipe = redis_client().pipeline()
    for v in (0.004, 0.3, 0.3, 7.0, 10_000):
        metrics.observe(pipe, metrics.JOB_LATENCY, v, "b", "succeeded")
    pipe.execute()
    s = scrape("fleet")
    le = {x.labels["le"]: x.value for x in s[P + "job_latency_seconds_bucket"]}
    assert (le["0.005"], le["0.25"], le["0.5"], le["5.0"], le["10.0"], le["600.0"], le["+Inf"]) == (1, 1, 3, 3, 4, 4, 5)
    assert list(le.values()) == sorted(le.values())
    assert value(s, P + "job_latency_seconds_count") == 5
    assert value(s, P + "job_latency_seconds_sum") == pytest.approx(10_007.604)


@pytest.mark.django_db
def test_metrics_need_the_token_or_a_staff_session(client, staff, user):
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200
    client.force_login(user)
    assert client.get("/metrics").status_code == 401  # a plain API user is not enough
    client.force_login(staff)
    assert client.get("/metrics/").status_code == 200


@pytest.mark.django_db
def test_no_token_configured_means_staff_only(client, settings):
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 401


@pytest.mark.django_db
def test_scopes_split_host_figures_from_fleet_figures(client, dev_backend):
    client.get("/healthz")  # at least one request through django-prometheus's middleware
    process = scrape("process")
    fleet = scrape("fleet")
    both = scrape("all")
    assert any(n.startswith("django_http_requests") for n in process)
    assert not any(n.startswith(P) for n in process)
    assert P + "queue_depth" in fleet and not any(n.startswith("django_http") for n in fleet)
    assert P + "queue_depth" in both and any(n.startswith("django_http_requests") for n in both)
    r = Client().get("/metrics?scope=nope", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert r.status_code == 400


@pytest.mark.django_db
def test_live_workers_are_listed_by_the_rq_collector():
    """RQ rebuilds registered workers with our class (Worker.all): its __init__ must allow that."""
    worker = ThreadedWorker(list(settings.JOB_QUEUES), connection=redis_client())
    worker.register_birth()
    try:
        s = scrape("fleet")
    finally:
        worker.register_death()
    assert value(s, "rq_workers", name=worker.name) == 1


def test_every_exported_domain_name_is_prefixed_and_declared():
    names = metrics.exported_names()
    assert all(n.startswith(P) for n in names)
    assert {P + "jobs_created_total", P + "job_latency_seconds_bucket", P + "queue_depth"} <= names
    assert settings.JOB_QUEUES == ("high", "normal", "low")


@pytest.mark.django_db
def test_tokens_and_cost_carry_the_tenant_and_earlier_series_count_as_none():
    from datetime import UTC, datetime
    from decimal import Decimal

    from workers.execution.run_facts import AttemptFacts, RunFacts
    from workers.execution.run_figures import record_fleet_figures

    at = datetime(2026, 1, 1, tzinfo=UTC)
    attempt = AttemptFacts(1, "dev", "succeeded", "", 0.01, at, at)
    for tenant in ("acme", "acme", ""):
        record_fleet_figures(
            RunFacts(
                job_id="j",
                queue="normal",
                state="succeeded",
                backend="dev",
                policy="p",
                enqueued_at=at,
                started_at=at,
                finished_at=at,
                prompt_tokens=3,
                completion_tokens=4,
                cost=Decimal("0.5"),
                attempts=[attempt],
                tenant=tenant,
            )
        )
    # written before the tenant label existed: two labels, counted as no tenant
    redis_client().hincrby(metrics.COUNTERS_KEY, metrics._field("tokens_total", "dev", "prompt"), 10)
    s = scrape("fleet")
    assert value(s, P + "tokens_total", backend="dev", kind="prompt", tenant="acme") == 6
    assert value(s, P + "tokens_total", backend="dev", kind="completion", tenant="acme") == 8
    assert value(s, P + "cost_total", backend="dev", tenant="acme") == 1.0
    assert value(s, P + "tokens_total", backend="dev", kind="prompt", tenant="-") == 13
    assert value(s, P + "cost_total", backend="dev", tenant="-") == 0.5
