"""Everything the dashboard shows, read in a bounded number of round trips whatever the table sizes.

Per refresh: four SQL queries, each bounded by an index and a limit or a one-hour window
(backends, policies, jobs per backend in the last hour, the last 20 jobs), and three Redis round
trips (queue depths + the hour's aggregates in one pipeline, the oldest waiting jobs' enqueue times,
the backends' live figures) plus ``workers.fleet.status.read_workers`` (an index of live workers, then
their hashes). Nothing counts the jobs table:
throughput, latency and cost come from :mod:`dashboard.aggregates`, written by the workers as
jobs finish.

Redis trouble costs the Redis panels, never the page: they say so, the database panels still show.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count
from django.urls import reverse
from django.utils import timezone
from redis.exceptions import RedisError
from rq.job import Job as RQJob
from rq.utils import utcparse

from dashboard import aggregates, charts
from jobs import fair_queue
from jobs.models import Job
from jobs.queueing import get_queue
from orchestrator_site.redis import redis_client
from routing import stats
from routing.models import Backend, RoutingPolicy
from routing.strategies import BackendStats
from workers.fleet.status import WorkerReport, read_workers

log = logging.getLogger(__name__)

RECENT_JOBS = 20
ROUTING_WINDOW = timedelta(hours=1)
RATE_MINUTES = 5  # the "per minute" figures average the last 5 whole minutes


@dataclass
class QueueRow:
    name: str
    depth: int
    oldest_age_s: float | None


@dataclass
class LatencyRow:
    backend: str
    wait: tuple[float | None, float | None, float | None]  # p50, p95, p99 in seconds
    execution: tuple[float | None, float | None, float | None]
    wait_samples: int
    execution_samples: int


@dataclass
class RoutingRow:
    backend: str
    jobs: int
    share: float

    @property
    def share_pct(self) -> float:
        return round(self.share * 100, 1)


@dataclass
class BackendRow:
    name: str
    kind: str
    enabled: bool
    drain: bool
    max_concurrency: int
    live: BackendStats
    cost_today: float
    succeeded_1h: int
    failed_1h: int
    change_url: str

    @property
    def load(self) -> float:
        return min(self.live.in_flight / self.max_concurrency, 1.0) if self.max_concurrency else 0.0


@dataclass
class RecentJob:
    id: str
    state: str
    priority: str
    backend: str
    age_s: float
    change_url: str


@dataclass
class Snapshot:
    """What one render of the dashboard shows; built by :func:`collect`."""

    now: datetime
    redis_error: str = ""
    queues: list[QueueRow] = field(default_factory=list)
    succeeded_per_min: float = 0.0
    failed_per_min: float = 0.0
    expired_per_min: float = 0.0  # not started within their queue timeout
    throughput_svg: str = ""
    latency: list[LatencyRow] = field(default_factory=list)
    wait_svg: str = ""
    execution_svg: str = ""
    execution_trend_svg: str = ""
    policy: RoutingPolicy | None = None
    other_policies: list[RoutingPolicy] = field(default_factory=list)
    routing: list[RoutingRow] = field(default_factory=list)
    routing_total: int = 0
    routing_other: int = 0
    backends: list[BackendRow] = field(default_factory=list)
    workers: list[WorkerReport] = field(default_factory=list)
    workers_error: str = ""
    recent: list[RecentJob] = field(default_factory=list)

    @property
    def cost_today_total(self) -> float:
        return sum(b.cost_today for b in self.backends)


def collect(now: datetime | None = None) -> Snapshot:
    """Read every panel's figures (see the module docstring for what that costs)."""
    now = now or timezone.now()
    snap = Snapshot(now=now)
    backends = list(Backend.objects.only("name", "kind", "enabled", "drain", "max_concurrency").order_by("name"))
    policies = list(RoutingPolicy.objects.only("name", "strategy", "is_active", "version").order_by("name"))
    snap.policy = next((p for p in policies if p.is_active), None)
    snap.other_policies = [p for p in policies if not p.is_active]
    _routing(snap, now)
    snap.recent = _recent(now)

    window = aggregates.Window(minutes=[], backends={}, cost_today={})
    live: dict[str, BackendStats] = {}
    try:
        window = _redis_panels(snap, now)
        live = stats.read_stats([b.name for b in backends], details=True)
    except RedisError as exc:
        log.warning("dashboard: Redis unavailable", extra={"error": str(exc)})
        snap.redis_error = f"Redis unavailable: {exc}"
    try:
        snap.workers = read_workers()
    except RedisError as exc:
        snap.workers_error = f"Redis unavailable: {exc}"

    for b in backends:
        bw = window.backends.get(b.name)
        snap.backends.append(
            BackendRow(
                name=b.name,
                kind=b.kind,
                enabled=b.enabled,
                drain=b.drain,
                max_concurrency=b.max_concurrency,
                live=live.get(b.name, BackendStats()),
                cost_today=window.cost_today.get(b.name, 0.0),
                succeeded_1h=bw.total("succeeded") if bw else 0,
                failed_1h=bw.total("failed") if bw else 0,
                change_url=reverse("admin:routing_backend_change", args=[b.pk]),
            )
        )
    return snap


def _redis_panels(snap: Snapshot, now: datetime) -> aggregates.Window:
    """Queues and the hour's aggregates in one pipeline, then the oldest jobs' enqueue times."""
    client = redis_client()
    queue_names = list(settings.RQ_QUEUES)
    pipe = client.pipeline(transaction=False)
    for name in queue_names:
        pipe.get(fair_queue.depth_key(name))
        pipe.zrange(fair_queue.heads_key(name), 0, 0, withscores=True)  # the oldest tenant head waited longest
        queue_key = get_queue(name).key
        pipe.llen(queue_key)  # RQ's own list: jobs from before the fair queue, other RQ jobs
        pipe.lindex(queue_key, 0)
    parse_window = aggregates.queue_read(pipe, now)
    replies = pipe.execute()
    n = 4 * len(queue_names)
    fair_depths, fair_heads, rq_depths, rq_heads = (replies[i:n:4] for i in range(4))
    window = parse_window(replies[n:])
    depths = [max(0, int(f or 0)) + int(r) for f, r in zip(fair_depths, rq_depths, strict=True)]

    enqueued: dict[int, float | None] = {
        i: max(now.timestamp() - head[0][1] / 1e6, 0.0) for i, head in enumerate(fair_heads) if head
    }
    waiting = [(i, h.decode()) for i, h in enumerate(rq_heads) if h and i not in enqueued]
    if waiting:
        pipe = client.pipeline(transaction=False)
        for _, rq_id in waiting:
            pipe.hget(RQJob.key_for(rq_id), "enqueued_at")
        for (i, _), raw in zip(waiting, pipe.execute(), strict=True):
            enqueued[i] = _age(raw, now)
    snap.queues = [
        QueueRow(name=name, depth=int(depth), oldest_age_s=enqueued.get(i))
        for i, (name, depth) in enumerate(zip(queue_names, depths, strict=True))
        if depth or name in settings.JOB_QUEUES  # pool queues only while they hold work
    ]

    succeeded, failed = window.per_minute("succeeded"), window.per_minute("failed")
    whole = slice(-RATE_MINUTES - 1, -1)  # the current minute is still filling up
    snap.succeeded_per_min = sum(succeeded[whole]) / RATE_MINUTES
    snap.failed_per_min = sum(failed[whole]) / RATE_MINUTES
    snap.expired_per_min = sum(window.per_minute("expired")[whole]) / RATE_MINUTES
    snap.throughput_svg = charts.throughput_chart(window.minutes, succeeded, failed)
    _latency(snap, window)
    return window


def _age(raw: bytes | None, now: datetime) -> float | None:
    if not raw:
        return None
    try:
        return max((now - utcparse(raw.decode())).total_seconds(), 0.0)
    except ValueError:
        return None


def _latency(snap: Snapshot, window: aggregates.Window) -> None:
    q = aggregates.quantile
    trend: dict[str, list[float | None]] = {}
    for name, bw in sorted(window.backends.items()):
        if not any(bw.wait) and not any(bw.execution):
            continue
        snap.latency.append(
            LatencyRow(
                backend=name,
                wait=(q(bw.wait, 0.5), q(bw.wait, 0.95), q(bw.wait, 0.99)),
                execution=(q(bw.execution, 0.5), q(bw.execution, 0.95), q(bw.execution, 0.99)),
                wait_samples=sum(bw.wait),
                execution_samples=sum(bw.execution),
            )
        )
        if any(bw.execution):
            trend[name] = [q(slot, 0.95) for slot in bw.execution_slots]
    if snap.latency:
        snap.wait_svg = charts.percentile_chart(
            "Queue wait p50 / p95 / p99 per backend, last hour", [(r.backend, *r.wait) for r in snap.latency]
        )
        snap.execution_svg = charts.percentile_chart(
            "Execution time p50 / p95 / p99 per backend, last hour", [(r.backend, *r.execution) for r in snap.latency]
        )
    if trend:
        snap.execution_trend_svg = charts.line_chart(
            f"Execution p95 per {aggregates.SLOT_MIN} minutes, per backend", trend, aggregates.SLOT_MIN
        )


def _routing(snap: Snapshot, now: datetime) -> None:
    """Jobs per backend created in the last hour; an index-only range scan on ``job_created_policy_backend``."""
    rows = (
        Job.objects.filter(created_at__gte=now - ROUTING_WINDOW)
        .order_by()
        .values_list("policy_name", "backend_name")
        .annotate(n=Count("*"))
    )
    active = snap.policy.name if snap.policy else None
    per_backend: dict[str, int] = {}
    for policy_name, backend_name, n in rows:
        if policy_name == active:
            per_backend[backend_name or "(none)"] = per_backend.get(backend_name or "(none)", 0) + n
        else:
            snap.routing_other += n
    snap.routing_total = sum(per_backend.values())
    snap.routing = [
        RoutingRow(backend=name, jobs=n, share=n / snap.routing_total if snap.routing_total else 0.0)
        for name, n in sorted(per_backend.items(), key=lambda kv: (-kv[1], kv[0]))
    ]


def _recent(now: datetime) -> list[RecentJob]:
    """The newest jobs: a backwards walk of the ``created_at`` index, LIMIT 20."""
    rows = Job.objects.order_by("-created_at").values_list("id", "state", "priority", "backend_name", "created_at")[
        :RECENT_JOBS
    ]
    return [
        RecentJob(
            id=str(pk),
            state=state,
            priority=priority,
            backend=backend or "—",
            age_s=max((now - created).total_seconds(), 0.0),
            change_url=reverse("admin:jobs_job_change", args=[pk]),
        )
        for pk, state, priority, backend, created in rows
    ]


def as_json(snap: Snapshot) -> dict[str, Any]:
    """The figures as plain data (no markup), for scripts and the benchmark's sanity check."""
    return {
        "now": snap.now.astimezone(UTC).isoformat(),
        "redis_error": snap.redis_error,
        "queues": [{"name": q.name, "depth": q.depth, "oldest_age_s": q.oldest_age_s} for q in snap.queues],
        "succeeded_per_min": snap.succeeded_per_min,
        "failed_per_min": snap.failed_per_min,
        "latency": [
            {
                "backend": r.backend,
                "wait_s": dict(zip(("p50", "p95", "p99"), r.wait, strict=True)),
                "execution_s": dict(zip(("p50", "p95", "p99"), r.execution, strict=True)),
                "wait_samples": r.wait_samples,
                "execution_samples": r.execution_samples,
            }
            for r in snap.latency
        ],
        "policy": snap.policy.name if snap.policy else None,
        "routing": {r.backend: r.jobs for r in snap.routing},
        "routing_other_policies": snap.routing_other,
        "backends": [
            {
                "name": b.name,
                "circuit": b.live.circuit_state,
                "in_flight": b.live.in_flight,
                "max_concurrency": b.max_concurrency,
                "ewma_ms": b.live.ewma_latency_ms,
                "error_rate": b.live.error_rate,
                "last_error": b.live.last_error,
                "cost_today": b.cost_today,
            }
            for b in snap.backends
        ],
        "workers": [
            {
                "name": w.name,
                "host": w.host,
                "queues": w.queues,
                "state": w.state,
                "in_flight": w.in_flight,
                "max_concurrency": w.max_concurrency,
                "unwritten": w.unwritten,
                "gpu": w.gpu,
            }
            for w in snap.workers
        ],
        "recent": [{"id": j.id, "state": j.state, "priority": j.priority, "backend": j.backend} for j in snap.recent],
    }
