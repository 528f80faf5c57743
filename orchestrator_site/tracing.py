"""OpenTelemetry traces from the API request through the queue into the worker.

Off by default, and then free: unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, no SDK provider is
built, Django is not instrumented, and every hook below returns after one check of ``ENABLED``
(no span objects, no context attach, nothing in the RQ job's meta).

On:

- the API: ``opentelemetry-instrumentation-django`` wraps each request in a server span;
- the queue: :func:`inject` writes the current context as W3C ``traceparent``/``tracestate`` into
  the RQ job's ``meta`` at enqueue (the RQ payload stays the bare job id);
- the worker: :func:`job_span` extracts it around the job's execution, so the worker's span is a
  child of the request's span, and :func:`add_attempt_spans` adds one child span per attempt (one
  backend call each), timed from the ``JobAttempt`` rows, so they are right whatever the task's
  retry and fallback code does;
- logs: :func:`current_ids` gives the JSON formatter the active ``trace_id``/``span_id``.

Spans go to the OTLP/HTTP exporter in batches (a background thread; a slow collector never blocks
a request). Each process builds its own provider after it starts (gunicorn forks before loading
the app unless ``--preload``; do not preload with tracing on, the batch thread does not survive a fork).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span, Tracer

    from workers.execution.run_facts import RunFacts

log = logging.getLogger(__name__)

ENABLED = False
SERVICE_NAME_DEFAULT = "llm-orchestrator"
_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def setup_from_env() -> bool:
    """Turn tracing on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (called once per process at start-up)."""
    if ENABLED or not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return ENABLED
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The exporter reads OTEL_EXPORTER_OTLP_ENDPOINT (and _HEADERS, _TIMEOUT) itself.
    configure(BatchSpanProcessor(OTLPSpanExporter()), set_global=True)
    log.info("tracing on", extra={"otlp_endpoint": os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"]})
    return True


def configure(*processors: SpanProcessor, set_global: bool = False) -> TracerProvider:
    """Build a provider with ``processors``, instrument Django with it and switch the hooks on.

    ``set_global`` also makes it the process-wide provider (so other OTEL instrumentations find
    it); that can happen once per process, so tests pass ``False`` and call :func:`shutdown`.
    """
    global ENABLED, _provider, _tracer
    from opentelemetry import trace
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME_DEFAULT)})
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    if set_global:
        trace.set_tracer_provider(provider)
    instrumentor = DjangoInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    # /metrics, health probes and static files are scraped constantly: not worth a trace each.
    instrumentor.instrument(tracer_provider=provider, excluded_urls="metrics,healthz,readyz,static")
    _provider, _tracer, ENABLED = provider, provider.get_tracer("llm_orchestrator"), True
    return provider


def shutdown() -> None:
    """Flush and switch everything off again (tests; process exit flushes via the SDK's atexit)."""
    global ENABLED, _provider, _tracer
    if _provider is not None:
        from opentelemetry.instrumentation.django import DjangoInstrumentor

        DjangoInstrumentor().uninstrument()
        _provider.shutdown()
    _provider, _tracer, ENABLED = None, None, False


def inject() -> dict[str, str] | None:
    """The current trace context as RQ job meta (``{"traceparent": ...}``), or None when off."""
    if not ENABLED:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier or None


@contextlib.contextmanager
def job_span(
    meta: Mapping[str, Any] | None, *, job_id: str, queue: str, worker: str, since: datetime | None = None
) -> Iterator[Span | None]:
    """The worker's span for one RQ execution, a child of the submitting request's span.

    ``since``: when the execution began, if before now (the worker claimed the job in a batch).
    """
    if not ENABLED or _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(carrier=dict(meta or {}))
    with _tracer.start_as_current_span(
        "run_job",
        context=parent,
        kind=SpanKind.CONSUMER,
        start_time=_ns(since) if since is not None else None,
        attributes={
            "messaging.system": "rq",
            "messaging.destination.name": queue,
            "llmo.job_id": job_id,
            "llmo.worker": worker,
        },
    ) as span:
        yield span


def _ns(value: datetime) -> int:
    return int(value.timestamp() * 1_000_000_000)


def add_attempt_spans(span: Span | None, run: RunFacts) -> None:
    """One child span per attempt of this run, timed from its row; marks the job span's outcome."""
    if span is None or _tracer is None:
        return
    from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

    ctx = set_span_in_context(span)
    for a in run.attempts:
        child = _tracer.start_span(
            f"attempt {a.number} {a.backend}",
            context=ctx,
            kind=SpanKind.CLIENT,
            start_time=_ns(a.started_at),
            attributes={"llmo.backend": a.backend, "llmo.attempt": a.number, "llmo.outcome": a.outcome},
        )
        if a.outcome in ("failed", "errored"):
            child.set_status(Status(StatusCode.ERROR, a.error[:500]))
        child.end(end_time=_ns(a.finished_at) if a.finished_at else None)
    span.set_attributes(
        {
            "llmo.state": run.state,
            "llmo.backend": run.backend,
            "llmo.policy": run.policy,
            "llmo.attempts": len(run.attempts),
        }
    )
    if run.state == "failed":
        span.set_status(Status(StatusCode.ERROR, "job failed"))


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) of the active span as hex, for log lines; None when off or outside a span."""
    if not ENABLED:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
