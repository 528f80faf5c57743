"""Prometheus metrics that cross hosts: workers write fleet figures to Redis, ``/metrics`` reads them.

Why not prometheus_client's multiprocess mode for everything: its per-process files live on one
host's disk, and our workers run on any host (GPU boxes, API-only boxes). Redis is already shared
by every process, so the fleet-wide *domain* figures are aggregated there:

- ``llmo:metrics:counters``   hash, one field per counter series (``<name>\\x1f<label>\\x1f...``), bumped
  with HINCRBY / HINCRBYFLOAT;
- ``llmo:metrics:hist:<name>`` hash per histogram: ``<labels>\\x1e<bucket index>`` holds the count of
  observations that fell in that bucket (non-cumulative; the collector sums them up) and
  ``<labels>\\x1esum`` the running sum.

Writers never read: the web process adds three HINCRBYs to the pipeline it already sends after
commit (no extra round trip), and a worker adds a finished run's figures to its own buffered
pipeline (``workers.execution.run_figures``: this module defines and exports them). Observations
are exact (a bucket counter is a counter), so ``histogram_quantile`` over ``rate()`` works as usual
and the figures survive any web or worker restart. Counters reset only when Redis loses its data,
which Prometheus treats like any counter reset.

The control plane's ``/metrics`` registers :class:`FleetCollector`, which at scrape time reads those
hashes plus live state: queue depth (every queue's waiting jobs), per-backend in-flight calls, circuit
state, error rate and latency (``routing.stats``), and django-rq's own queue/worker figures
(``RQCollector``). Process-local figures (django-prometheus HTTP/DB metrics, Python runtime) come
from the serving process, or from prometheus_client's multiprocess directory when
``PROMETHEUS_MULTIPROC_DIR`` is set (gunicorn with several workers on one host).

Scopes: ``/metrics?scope=process`` is the host's own figures (scrape every web host),
``/metrics?scope=fleet`` the Redis-backed fleet figures (scrape through one address: every web host
reports the same fleet numbers, so scraping each would double the rates), and ``/metrics`` both (one
web host, the dev stack). Access: ``Authorization: Bearer $METRICS_TOKEN`` or a staff session.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from secrets import compare_digest
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from orchestrator_site.redis import key, redis_client

if TYPE_CHECKING:
    from redis.client import Pipeline

log = logging.getLogger(__name__)

PREFIX = "llm_orchestrator_"
COUNTERS_KEY = key("metrics", "counters")
LABEL_SEP = "\x1f"
BUCKET_SEP = "\x1e"
# Seconds, from a cached dev call (ms) to a slow local generation (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class CounterDef:
    name: str  # without PREFIX; ends in _total
    doc: str
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class HistogramDef:
    name: str  # without PREFIX
    doc: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = LATENCY_BUCKETS

    @property
    def redis_key(self) -> str:
        return key("metrics", "hist", self.name)


JOBS_CREATED = CounterDef("jobs_created_total", "Jobs accepted by the API (rows committed).")
JOBS_ENQUEUED = CounterDef("jobs_enqueued_total", "Jobs put on an RQ queue by the API.", ("priority",))
ROUTING_DECISIONS = CounterDef(
    "routing_decisions_total", "Routing decisions by active policy and chosen backend.", ("policy", "backend")
)
JOBS_FINISHED = CounterDef(
    "jobs_finished_total", "Jobs that reached a final state in a worker.", ("backend", "outcome")
)
BACKEND_ATTEMPTS = CounterDef(
    "backend_attempts_total", "Backend calls (job attempts) by outcome.", ("backend", "outcome")
)
BACKEND_ERRORS = CounterDef("backend_errors_total", "Backend calls that failed or errored.", ("backend",))
TOKENS = CounterDef(
    "tokens_total",
    "Tokens reported by backends (kind = prompt|completion), by the job's tenant ('-': none).",
    ("backend", "kind", "tenant"),
)
COST = CounterDef(
    "cost_total",
    "Cost of finished jobs in the backends' price unit (cost_*_per_1k), by the job's tenant ('-': none).",
    ("backend", "tenant"),
)
WEBHOOK_ATTEMPTS = CounterDef(
    "webhook_attempts_total",
    "Webhook delivery attempts by outcome (succeeded, http_error, timeout, connection_error, refused).",
    ("outcome",),
)
NO_TENANT = "-"
COUNTERS = (
    JOBS_CREATED,
    JOBS_ENQUEUED,
    ROUTING_DECISIONS,
    JOBS_FINISHED,
    BACKEND_ATTEMPTS,
    BACKEND_ERRORS,
    TOKENS,
    COST,
    WEBHOOK_ATTEMPTS,
)

JOB_LATENCY = HistogramDef(
    "job_latency_seconds", "From enqueue to the final state, by backend and outcome.", ("backend", "outcome")
)
QUEUE_WAIT = HistogramDef("job_queue_wait_seconds", "From enqueue until a worker started the job.", ("queue",))
EXECUTION = HistogramDef(
    "job_execution_seconds", "From a worker's start to the final state (all attempts).", ("backend", "outcome")
)
BACKEND_CALL = HistogramDef(
    "backend_call_seconds", "Duration of one backend call (one attempt), by outcome.", ("backend", "outcome")
)
WEBHOOK_ATTEMPT_SECONDS = HistogramDef(
    "webhook_attempt_seconds", "Duration of one webhook delivery attempt, by outcome.", ("outcome",)
)
HISTOGRAMS = (JOB_LATENCY, QUEUE_WAIT, EXECUTION, BACKEND_CALL, WEBHOOK_ATTEMPT_SECONDS)

# Families the collector computes at scrape time (names listed for the dashboard check).
GAUGES = (
    "queue_depth",
    "backend_in_flight",
    "backend_circuit_state",
    "backend_error_rate",
    "backend_latency_ewma_seconds",
    "backend_latency_p95_seconds",
    "backend_enabled",
)
CIRCUIT_STATES = ("closed", "half_open", "open")


def exported_names() -> set[str]:
    """Every sample name ``/metrics`` can expose for our domain (dashboards must use only these)."""
    names = {PREFIX + c.name for c in COUNTERS} | {PREFIX + g for g in GAUGES}
    for h in HISTOGRAMS:
        names |= {PREFIX + h.name + suffix for suffix in ("_bucket", "_sum", "_count")}
    return names


# --- writing (web and worker processes) -------------------------------------------------------
def _field(*parts: object) -> str:
    return LABEL_SEP.join(str(p).replace(LABEL_SEP, " ").replace(BUCKET_SEP, " ") for p in parts)


def inc(pipe: Pipeline, counter: CounterDef, *labels: object, amount: float = 1) -> None:
    """Queue a counter increment on ``pipe`` (sent with the caller's round trip)."""
    assert len(labels) == len(counter.labels), counter.name
    if isinstance(amount, int):
        pipe.hincrby(COUNTERS_KEY, _field(counter.name, *labels), amount)
    else:
        pipe.hincrbyfloat(COUNTERS_KEY, _field(counter.name, *labels), amount)


def observe(pipe: Pipeline, hist: HistogramDef, value: float, *labels: object) -> None:
    """Queue one histogram observation on ``pipe``: two commands, no read."""
    assert len(labels) == len(hist.labels), hist.name
    value = max(float(value), 0.0)
    index = next((i for i, bound in enumerate(hist.buckets) if value <= bound), len(hist.buckets))
    series = _field(*labels)
    pipe.hincrby(hist.redis_key, f"{series}{BUCKET_SEP}{index}", 1)
    pipe.hincrbyfloat(hist.redis_key, f"{series}{BUCKET_SEP}sum", value)


def record_submission(pipe: Pipeline, *, priority: str, policy: str, backend: str) -> None:
    """The API's figures for one accepted job, added to the after-commit pipeline."""
    inc(pipe, JOBS_CREATED)
    inc(pipe, JOBS_ENQUEUED, priority)
    inc(pipe, ROUTING_DECISIONS, policy or "-", backend)


# --- reading (the control plane's /metrics) -------------------------------------------------
def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _counter_families(raw: dict[str, str]) -> Iterator[Metric]:
    series: dict[str, list[tuple[list[str], float]]] = {}
    for fld, value in raw.items():
        name, *labels = fld.split(LABEL_SEP)
        series.setdefault(name, []).append((labels, float(value)))
    for c in COUNTERS:
        # CounterMetricFamily appends _total itself.
        fam = CounterMetricFamily(PREFIX + c.name.removesuffix("_total"), c.doc, labels=list(c.labels))
        summed: dict[tuple[str, ...], float] = {}
        for labels, value in series.get(c.name, []):
            if len(labels) == len(c.labels) - 1 and c.labels[-1] == "tenant":
                labels = [*labels, NO_TENANT]  # counted before the tenant label: no tenant
            if len(labels) == len(c.labels):
                summed[tuple(labels)] = summed.get(tuple(labels), 0.0) + value
        for labels, value in sorted(summed.items()):
            fam.add_metric(list(labels), value)
        yield fam


def _histogram_family(h: HistogramDef, raw: dict[str, str]) -> Metric:
    per_series: dict[str, dict[str, float]] = {}
    for fld, value in raw.items():
        series, _, slot = fld.rpartition(BUCKET_SEP)
        per_series.setdefault(series, {})[slot] = float(value)
    fam = HistogramMetricFamily(PREFIX + h.name, h.doc, labels=list(h.labels))
    for series, slots in sorted(per_series.items()):
        labels = series.split(LABEL_SEP) if h.labels else []
        if len(labels) != len(h.labels):
            continue
        cumulative, buckets = 0.0, []
        for i, bound in enumerate((*h.buckets, float("inf"))):
            cumulative += slots.get(str(i), 0.0)
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        fam.add_metric(labels, buckets, sum_value=slots.get("sum", 0.0))
    return fam


class FleetCollector(Collector):
    """Reads the fleet figures from Redis (two round trips) and the backend list from the DB (one query)."""

    def collect(self) -> Iterable[Metric]:
        from jobs import fair_queue
        from routing import stats
        from routing.models import Backend

        client = redis_client()
        try:
            pipe = client.pipeline(transaction=False)
            pipe.hgetall(COUNTERS_KEY)
            for h in HISTOGRAMS:
                pipe.hgetall(h.redis_key)
            pipe.smembers("rq:queues")
            pipe.smembers(fair_queue.KNOWN_QUEUES_KEY)
            counters, *hists, queue_keys, fair_names = pipe.execute()
            queues = sorted(
                {k.decode().removeprefix("rq:queue:") for k in queue_keys}
                | {n.decode() for n in fair_names}
                | set(settings.JOB_QUEUES)
            )
            depths = list(fair_queue.depths(queues, client).values())
        except RedisError as exc:
            log.warning("fleet metrics unavailable", extra={"error": str(exc)})
            return
        yield from _counter_families(_decode(counters))
        for h, raw in zip(HISTOGRAMS, hists, strict=True):
            yield _histogram_family(h, _decode(raw))
        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Jobs waiting in each queue.", labels=["queue"])
        for q, n in zip(queues, depths, strict=True):
            depth.add_metric([q], n)
        yield depth
        yield from _backend_families(dict(Backend.objects.values_list("name", "enabled")), stats)


def _backend_families(backends: dict[str, bool], stats: Any) -> Iterator[Metric]:
    try:
        figures = stats.read_stats(list(backends))
    except RedisError as exc:
        log.warning("backend figures unavailable", extra={"error": str(exc)})
        figures = {}
    g = functools.partial(GaugeMetricFamily, labels=["backend"])
    in_flight = g(PREFIX + "backend_in_flight", "Calls in flight on each backend (unexpired leases).")
    error_rate = g(PREFIX + "backend_error_rate", "Share of failed calls in the backend's recent window.")
    ewma = g(PREFIX + "backend_latency_ewma_seconds", "EWMA of successful call latency.")
    p95 = g(PREFIX + "backend_latency_p95_seconds", "P95 of successful call latency over the recent window.")
    enabled = g(PREFIX + "backend_enabled", "1 when the backend is enabled in the registry.")
    circuit = GaugeMetricFamily(
        PREFIX + "backend_circuit_state", "1 for the backend's current circuit state.", labels=["backend", "state"]
    )
    for name, is_enabled in sorted(backends.items()):
        enabled.add_metric([name], 1 if is_enabled else 0)
        s = figures.get(name)
        if s is None:
            continue
        in_flight.add_metric([name], s.in_flight)
        error_rate.add_metric([name], s.error_rate)
        if s.ewma_latency_ms is not None:
            ewma.add_metric([name], s.ewma_latency_ms / 1000)
        if s.p95_latency_ms is not None:
            p95.add_metric([name], s.p95_latency_ms / 1000)
        for state in CIRCUIT_STATES:
            circuit.add_metric([name, state], 1 if s.circuit_state == state else 0)
    yield from (in_flight, error_rate, ewma, p95, enabled, circuit)


# --- the /metrics view --------------------------------------------------------------------------
@functools.cache
def fleet_registry() -> CollectorRegistry:
    """Built once per process; collectors run at scrape time only."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector())
    from django_rq.contrib.prometheus import RQCollector

    if RQCollector is not None:
        registry.register(_Guarded(RQCollector()))
    return registry


class _Guarded(Collector):
    """A third-party collector whose failure must cost its own figures, not the whole scrape."""

    def __init__(self, inner: Collector) -> None:
        self.inner = inner

    def collect(self) -> Iterable[Metric]:
        try:
            families = list(self.inner.collect())
        except Exception as exc:
            log.warning("collector failed", extra={"collector": type(self.inner).__name__, "error": repr(exc)})
            return []
        return families


@functools.cache
def process_registry() -> CollectorRegistry:
    """This host's own figures: multiprocess files when gunicorn runs several workers, else this process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def authorized(request: HttpRequest) -> bool:
    """A bearer token equal to ``METRICS_TOKEN``, or a logged-in staff user."""
    token = getattr(settings, "METRICS_TOKEN", "")
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer "):
        # Bytes, not str: compare_digest refuses non-ASCII str, and a header may hold any bytes.
        offered = header.removeprefix("Bearer ").strip().encode("utf-8", "surrogatepass")
        if compare_digest(offered, token.encode("utf-8", "surrogatepass")):
            return True
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


SCOPES: dict[str, Sequence[str]] = {"process": ("process",), "fleet": ("fleet",), "all": ("process", "fleet")}


@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition; ``?scope=process|fleet|all`` (default all)."""
    if not authorized(request):
        response = HttpResponse("Metrics need a bearer token (METRICS_TOKEN) or a staff session.\n", status=401)
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    scope = request.GET.get("scope", "all")
    if scope not in SCOPES:
        return HttpResponse(f"scope must be one of {', '.join(SCOPES)}\n", status=400)
    parts = [generate_latest(process_registry() if part == "process" else fleet_registry()) for part in SCOPES[scope]]
    return HttpResponse(b"".join(parts), content_type=CONTENT_TYPE_LATEST)
