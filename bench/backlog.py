"""What the fair-queue benches share: a throw-away site, tenants, and jobs made in bulk.

Jobs are made without HTTP: ``POST /jobs`` costs milliseconds a job (a 100,000-job backlog would take
minutes) and does not yet assign a tenant. Each job is a ``Job`` row as the submit path builds it
(the ``dev`` backend, its queue, ``enqueued_at``), inserted with ``bulk_create``, then queued with
``jobs.queueing.enqueue`` (what ``POST /jobs`` calls after commit) in one Redis pipeline per batch.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def site(redis_db: int, database_url: str = "", redis_host: str = "127.0.0.1", **extra: str) -> Iterator[dict]:
    """Django set up on a temporary SQLite (or ``database_url``) and Redis db ``redis_db``, flushed before
    and after; yields the environment worker processes get. ``DEBUG=0``; no reconcile pass unless asked."""
    tmp = Path(tempfile.mkdtemp(prefix="llmo-bench-fair-"))
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY_FILE", "DATABASE_URL", "MAX_CONCURRENCY")}
    env.update(
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings",
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="testserver,localhost",
        DATABASE_URL=database_url or f"sqlite:///{tmp / 'bench.sqlite3'}",
        REDIS_URL=f"redis://{redis_host}:6379/{redis_db}",
        VAR_DIR=str(tmp),
        LOG_LEVEL="ERROR",
        RECONCILE_INTERVAL_MS="0",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    from orchestrator_site.redis import redis_client

    redis_client().flushdb()
    call_command("migrate", verbosity=0)
    try:
        yield env
    finally:
        try:
            redis_client().flushdb()
        except Exception:
            pass
        shutil.rmtree(tmp, ignore_errors=True)


def reset(latency_ms: int) -> Any:
    """Empty queues and job table; the one ``dev`` backend at ``latency_ms``; an active policy. Returns it."""
    from jobs.models import Job
    from orchestrator_site.redis import redis_client
    from routing import policies
    from routing.models import Backend, BackendKind, RoutingPolicy
    from tenants.models import Tenant

    redis_client().flushdb()
    Job.objects.all().delete()
    Tenant.objects.all().delete()
    backend, _ = Backend.objects.update_or_create(
        name="dev",
        defaults={"kind": BackendKind.DEV, "config": {"latency_ms": latency_ms}, "max_concurrency": 64},
    )
    if not RoutingPolicy.objects.filter(is_active=True).exists():
        policies.activate(RoutingPolicy.objects.create(name="bench", strategy="ordered", params={}))
    return backend


def user() -> Any:
    from django.contrib.auth import get_user_model

    return get_user_model().objects.get_or_create(username="bench")[0]


def tenant(name: str, weight: int = 1) -> Any:
    from tenants.models import Tenant

    return Tenant.objects.create(name=name, weight=weight)


def create_jobs(
    n: int,
    backend: Any,
    *,
    owner: Any = None,
    tenant: Any = None,
    priority: str = "normal",
    queue_timeout_s: int | None = None,
    label: str = "job",
    batch: int = 2000,
) -> list[str]:
    """``n`` queued jobs of ``tenant`` in submission order (distinct enqueue times); their ids."""
    from django.utils import timezone

    from jobs import queueing
    from jobs.models import Job, JobState
    from orchestrator_site.redis import redis_client

    ids: list[str] = []
    for start in range(0, n, batch):
        now = timezone.now()
        rows = []
        for i in range(start, min(n, start + batch)):
            at = now + timedelta(microseconds=i - start)
            job = Job(
                state=JobState.QUEUED,
                priority=priority,
                prompt=f"{label} {i}",
                timeout_s=30,
                created_by=owner,
                tenant=tenant,
                queue_timeout_s=queue_timeout_s,
                expires_at=at + timedelta(seconds=queue_timeout_s) if queue_timeout_s else None,
                backend=backend,
                backend_name=backend.name,
                created_at=at,
                enqueued_at=at,
            )
            job.queue = backend.queue_for(priority)
            job.rq_job_id = str(job.pk)
            rows.append(job)
        Job.objects.bulk_create(rows)
        pipe = redis_client().pipeline(transaction=False)
        for job in rows:
            queueing.enqueue(job, pipeline=pipe)
        pipe.execute()
        ids.extend(str(job.pk) for job in rows)
    return ids


def start_order(ids: list[str]) -> list[str]:
    """``ids`` that started, in the order their runs started (the claim time, then the attempt's)."""
    from jobs.models import Job

    rows = Job.objects.filter(pk__in=ids, started_at__isnull=False).order_by("started_at", "attempts__started_at")
    return list(dict.fromkeys(str(pk) for pk in rows.values_list("pk", flat=True)))


@contextmanager
def workers(env: dict, n: int, **extra: str) -> Iterator[list[subprocess.Popen]]:
    """``n`` ``manage.py rqworker high normal low`` processes as the project starts them; SIGTERM at the end."""
    cmd = [sys.executable, "manage.py", "rqworker", "high", "normal", "low"]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env={**env, **extra}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(n)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_until(done: Any, timeout_s: float, every_s: float = 0.2) -> float:
    """Poll ``done()`` until true; the seconds it took (raises after ``timeout_s``)."""
    t0 = time.monotonic()
    while not done():
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"gave up after {timeout_s:.0f} s")
        time.sleep(every_s)
    return time.monotonic() - t0
