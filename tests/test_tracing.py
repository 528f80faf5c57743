"""One trace from the API request, through the RQ queue, into the worker and its attempts.

The worker runs in this process (a burst ``ThreadedWorker``, the class ``rqworker`` uses) so an
in-memory exporter sees the API's and the worker's spans together; the trace context still crosses
the queue only as the RQ job's meta in Redis, exactly as it does between hosts.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
from django.conf import settings
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from rq.job import Job as RQJob

from jobs.models import Job, JobState
from orchestrator_site import tracing
from orchestrator_site.logs import JsonFormatter
from orchestrator_site.redis import redis_client
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import ROOT, process_env, token_client
from workers.runtime.threaded import ThreadedWorker

OTEL_MIDDLEWARE = "opentelemetry.instrumentation.django.middleware.otel_middleware._DjangoMiddleware"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(SimpleSpanProcessor(exporter))
    yield exporter
    tracing.shutdown()


def drain() -> None:
    ThreadedWorker(list(settings.JOB_QUEUES), connection=redis_client()).work(burst=True)


@pytest.mark.django_db(transaction=True)
def test_one_trace_spans_api_request_worker_and_attempts(spans, user, db):
    Backend.objects.create(name="flaky", kind=BackendKind.DEV, config={"fail_rate": 1, "fail_status": 503})
    Backend.objects.create(name="steady", kind=BackendKind.DEV)
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["flaky", "steady"]}))
    Backend.objects.filter(name="flaky").update(config={"fail_rate": 1, "fail_status": 503, "retry_max": 0})

    r = token_client(user).post("/jobs", {"prompt": "trace me"}, format="json")
    assert r.status_code == 202, r.content
    job_id = r.json()["id"]
    meta = RQJob.fetch(job_id, connection=redis_client(), serializer="rq.serializers.JSONSerializer").meta
    assert meta["traceparent"].startswith("00-")

    records = io.StringIO()
    handler = logging.StreamHandler(records)
    handler.setFormatter(JsonFormatter())
    task_log = logging.getLogger("workers.execution")  # the job run and its outcomes
    old_level = task_log.level
    task_log.addHandler(handler)
    task_log.setLevel(logging.INFO)
    try:
        drain()
    finally:
        task_log.removeHandler(handler)
        task_log.setLevel(old_level)

    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.SUCCEEDED
    assert job.trace_id == meta["traceparent"].split("-")[1]  # kept on the row after the RQ job is gone
    finished = spans.get_finished_spans()
    server = [s for s in finished if s.kind == SpanKind.SERVER and s.attributes.get("http.method", "POST") == "POST"]
    assert len(server) == 1, [s.name for s in finished]
    request_span = server[0]
    (worker_span,) = [s for s in finished if s.name == "run_job"]
    assert worker_span.context.trace_id == request_span.context.trace_id
    assert worker_span.parent.span_id == request_span.context.span_id
    assert worker_span.attributes["llmo.job_id"] == job_id
    assert worker_span.attributes["llmo.state"] == "succeeded"
    attempts = sorted((s for s in finished if s.name.startswith("attempt ")), key=lambda s: s.start_time)
    assert [a.attributes["llmo.backend"] for a in attempts] == [a.backend_name for a in job.attempts.order_by("number")]
    assert attempts, "every attempt gets a span"
    for a in attempts:
        assert a.parent.span_id == worker_span.context.span_id
        assert a.context.trace_id == request_span.context.trace_id
        assert worker_span.start_time <= a.start_time <= a.end_time <= worker_span.end_time
    # log lines written inside the worker's span carry its trace id
    lines = [json.loads(line) for line in records.getvalue().splitlines()]
    assert lines and all(line["trace_id"] == format(request_span.context.trace_id, "032x") for line in lines)
    assert {line["job_id"] for line in lines if "job_id" in line} == {job_id}


@pytest.mark.django_db(transaction=True)
def test_tracing_off_by_default_costs_nothing(api, policy):
    from opentelemetry import trace

    assert not tracing.ENABLED
    assert tracing.inject() is None and tracing.current_ids() is None
    assert OTEL_MIDDLEWARE not in settings.MIDDLEWARE
    assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"  # no SDK provider built
    r = api.post("/jobs", {"prompt": "untraced"}, format="json")
    meta = RQJob.fetch(r.json()["id"], connection=redis_client(), serializer="rq.serializers.JSONSerializer").meta
    assert "traceparent" not in meta and Job.objects.get(pk=r.json()["id"]).trace_id == ""
    with tracing.job_span({}, job_id="x", queue="normal", worker="w") as span:
        assert span is None


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_otlp_endpoint_turns_tracing_on_at_start_up():
    code = (
        "from django.conf import settings; from orchestrator_site import tracing; "
        "p = tracing._provider; "
        "print(tracing.ENABLED, type(p._active_span_processor._span_processors[0]).__name__, "
        f"{OTEL_MIDDLEWARE!r} in settings.MIDDLEWARE)"
    )
    env = process_env(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_SERVICE_NAME="t")
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].split() == ["True", "BatchSpanProcessor", "True"]
