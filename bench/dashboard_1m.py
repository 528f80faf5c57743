"""How fast is the live dashboard with a million jobs in the database?

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dashbench .venv/bin/python bench/dashboard_1m.py
    .venv/bin/python bench/dashboard_1m.py --rows 200000          # SQLite in a temporary folder
    ... --last-hour 100000   # a busier hour: 100k of the rows created in the last hour

Loads ``--rows`` Job rows (PostgreSQL: ``COPY``; SQLite: ``executemany`` in one transaction), a
realistic Redis state (the hour's dashboard aggregates, live backend figures, workers, a few hundred
queued RQ jobs, and filler keys standing in for the status mirror of the hour's jobs), then times
``--requests`` GETs of ``/admin/dashboard/`` (the whole page) and of ``/admin/dashboard/panels/``
(what the page's script fetches every 2.5 s) through Django's test client, logged in as staff.
Reports p50 / p95 / max per URL plus the plan of the one query that reads a range of jobs.

A PostgreSQL database that does not exist is created, and dropped at the end unless ``--keep``;
``--reuse`` times an existing, already loaded database without loading more. Redis: only
``--redis-url`` (default db 13), flushed before and after. Never run it against a live system.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import accumulate
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BACKENDS = [  # name, kind, share of jobs, typical execution seconds, failure rate, pool
    ("dev", "dev", 0.10, 0.02, 0.01, ""),
    ("ollama-local", "ollama", 0.25, 1.5, 0.03, ""),
    ("openai-main", "openai", 0.30, 0.9, 0.02, ""),
    ("vllm-a100", "openai", 0.20, 0.6, 0.05, ""),
    ("gpu-qwen", "hf_local", 0.15, 0.3, 0.01, "gpu"),
]
# The columns a row generates, in this order; every other column gets the model's default (COPY and
# INSERT name their columns, so fields added to Job later are covered as long as they have a default).
VARYING = (
    "id",
    "rq_job_id",
    "state",
    "priority",
    "backend_id",
    "backend_name",
    "policy_name",
    "queue",
    "attempt_count",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "latency_ms",
    "created_at",
    "enqueued_at",
    "started_at",
    "finished_at",
    "updated_at",
)
FIXED = {"prompt": "Summarize the following page in three sentences.", "timeout_s": 60}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="Job rows to load (default 1,000,000)")
    p.add_argument("--days", type=float, default=7, help="spread the rows over this many days (default 7)")
    p.add_argument("--last-hour", type=int, default=None, help="rows created in the last hour (default: uniform)")
    p.add_argument("--requests", type=int, default=50, help="timed requests per URL (default 50)")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
    p.add_argument("--redis-filler", type=int, default=None, help="extra Redis keys (default: 2 per last-hour job)")
    p.add_argument("--keep", action="store_true", help="keep the database (PostgreSQL) at the end")
    p.add_argument("--reuse", action="store_true", help="time an already loaded database; load nothing")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args()


# --- database set-up, before Django starts ------------------------------------------------------------
def prepare_database(url: str, *, reuse: bool) -> bool:
    """Create the PostgreSQL database when missing; returns whether this run created it."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists:
            if not reuse:
                sys.exit(f"database {name!r} exists: drop it, or pass --reuse to time it as it is")
            return False
        if reuse:
            sys.exit(f"--reuse: database {name!r} does not exist")
        conn.execute(f'CREATE DATABASE "{name}"')
    return True


def drop_database(url: str) -> None:
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- rows -------------------------------------------------------------------------------------------------
def make_rows(n: int, now: datetime, days: float, last_hour: int | None, backend_ids: dict[str, int], rng) -> Any:
    """Yield one tuple of :data:`VARYING` values per job; times are unix seconds (the loaders format them)."""
    names = [b[0] for b in BACKENDS]
    cum = list(accumulate(b[2] for b in BACKENDS))
    profile = {b[0]: b for b in BACKENDS}
    priorities, cum_priorities = ("high", "normal", "low"), (0.2, 0.8, 1.0)
    now_s = now.timestamp()
    span = days * 86400
    recent = n // max(int(days * 24), 1) if last_hour is None else min(last_hour, n)
    switch = now_s - 86400  # the 'default' policy has been active for a day; 'cheap' before
    for i in range(n):
        age = rng.random() * 3600 if i >= n - recent else 3600 + rng.random() * (span - 3600)
        created = now_s - age
        backend = rng.choices(names, cum_weights=cum)[0]
        _, _, _, exec_typ, fail_rate, pool = profile[backend]
        priority = rng.choices(priorities, cum_weights=cum_priorities)[0]
        queue = f"{pool}-{priority}" if pool else priority
        policy = "default" if created >= switch else "cheap"
        job_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        enqueued = created + 0.003
        if age < 20 and rng.random() < 0.5:
            yield (job_id, job_id, "queued", priority, backend_ids[backend], backend, policy, queue, 0,
                   None, None, None, None, created, enqueued, None, None, enqueued)  # fmt: skip
            continue
        started = enqueued + rng.expovariate(2.5)
        execution = rng.lognormvariate(0, 0.5) * exec_typ
        finished = started + execution
        failed = rng.random() < fail_rate
        state = "failed" if failed else ("canceled" if rng.random() < 0.005 else "succeeded")
        prompt_t, completion_t = rng.randint(10, 2000), 0 if failed else rng.randint(1, 800)
        cost = (prompt_t * 0.0005 + completion_t * 0.0015) / 1000
        yield (job_id, job_id, state, priority, backend_ids[backend], backend, policy, queue, 1,
               prompt_t, completion_t, f"{cost:.8f}", int(execution * 1000), created, enqueued, started, finished,
               finished)  # fmt: skip


TIMES = {VARYING.index(c) for c in ("created_at", "enqueued_at", "started_at", "finished_at", "updated_at")}


def load_jobs(args: argparse.Namespace, now: datetime, backend_ids: dict[str, int]) -> None:
    from django.db import connection, transaction

    from jobs.models import Job

    rng = random.Random(args.seed)
    rows = make_rows(args.rows, now, args.days, args.last_hour, backend_ids, rng)
    fixed = [f for f in Job._meta.concrete_fields if f.column not in VARYING]
    started = time.perf_counter()
    if connection.vendor == "postgresql":
        _copy_postgres(connection, fixed, rows)
    else:
        with transaction.atomic():
            _insert_sqlite(connection, fixed, rows)
    load_s = time.perf_counter() - started
    print(f"loaded {args.rows:,} jobs in {load_s:.1f} s ({args.rows / load_s:,.0f} rows/s)")
    started = time.perf_counter()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("VACUUM (ANALYZE) jobs_job")  # visibility map: index-only scans need it
        else:
            cursor.execute("ANALYZE")
    print(f"vacuum/analyze in {time.perf_counter() - started:.1f} s")


def _default(field: Any) -> Any:
    if field.column in FIXED:
        return FIXED[field.column]
    return field.get_default() if field.has_default() else (None if field.null else "")


def _copy_postgres(connection, fixed: list, rows) -> None:
    """COPY into the table with only its primary key, then build the other indexes in bulk (several
    times faster than maintaining seven indexes row by row)."""
    from django.db.models import JSONField

    def text(value: Any) -> str:
        if value is None:
            return "\\N"
        if isinstance(value, bool):
            return "t" if value else "f"
        return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")

    tail = "".join("\t" + text(json.dumps(_default(f)) if isinstance(f, JSONField) else _default(f)) for f in fixed)
    columns = [*VARYING, *(f.column for f in fixed)]
    connection.ensure_connection()
    raw = connection.connection  # psycopg 3
    with raw.cursor() as cursor:
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'jobs_job'")
        indexes = [(name, sql) for name, sql in cursor.fetchall() if not name.endswith("_pkey")]
        for name, _ in indexes:
            cursor.execute(f'DROP INDEX "{name}"')
        cursor.execute("SET synchronous_commit = off")
        cursor.execute("SET maintenance_work_mem = '256MB'")
        with cursor.copy(f"COPY jobs_job ({', '.join(columns)}) FROM STDIN") as copy:
            chunk: list[str] = []
            for row in rows:
                chunk.append(
                    "\t".join(
                        "\\N" if v is None else (_pg_time(v) if i in TIMES else str(v)) for i, v in enumerate(row)
                    )
                    + tail
                )
                if len(chunk) >= 20_000:
                    copy.write("\n".join(chunk) + "\n")
                    chunk.clear()
            if chunk:
                copy.write("\n".join(chunk) + "\n")
        started = time.perf_counter()
        for _, sql in indexes:
            cursor.execute(sql)
        print(f"rebuilt {len(indexes)} indexes in {time.perf_counter() - started:.1f} s")
    raw.commit()


def _pg_time(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat()


def _insert_sqlite(connection, fixed: list, rows) -> None:
    """executemany in one transaction, with the secondary indexes dropped during the load and
    rebuilt after (as for PostgreSQL)."""

    def sqlite_time(unix_s: float) -> str:  # Django keeps naive UTC text in SQLite
        return datetime.fromtimestamp(unix_s, UTC).replace(tzinfo=None).isoformat(" ")

    constants = tuple(f.get_db_prep_save(_default(f), connection) for f in fixed)
    columns = [*VARYING, *(f.column for f in fixed)]
    sql = f"INSERT INTO jobs_job ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    raw = connection.connection
    indexes = raw.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs_job' AND sql IS NOT NULL"
    ).fetchall()
    for name, _ in indexes:
        raw.execute(f'DROP INDEX "{name}"')
    batch: list[tuple] = []
    for row in rows:
        values = [sqlite_time(v) if i in TIMES and v is not None else v for i, v in enumerate(row)]
        values[0] = values[0].replace("-", "")  # UUIDField: 32 hex digits in SQLite
        batch.append((*values, *constants))
        if len(batch) >= 20_000:
            raw.executemany(sql, batch)
            batch.clear()
    if batch:
        raw.executemany(sql, batch)
    started = time.perf_counter()
    for _, index_sql in indexes:
        raw.execute(index_sql)
    print(f"rebuilt {len(indexes)} indexes in {time.perf_counter() - started:.1f} s")


# --- Redis state ----------------------------------------------------------------------------------------
def fill_redis(args: argparse.Namespace, now: datetime, recent_jobs: int) -> None:
    """What a busy fleet leaves in Redis: the hour's aggregates, live figures, workers, queued jobs."""
    from dashboard import aggregates
    from jobs.queueing import TASK, get_queue
    from orchestrator_site.redis import redis_client
    from routing import stats
    from workers.execution.run_facts import AttemptFacts, RunFacts
    from workers.fleet.status import GPU_STATUS_KEY as STATUS_KEY
    from workers.fleet.status import WorkerReport, publish

    rng = random.Random(args.seed + 1)
    client = redis_client()
    pipe = client.pipeline(transaction=False)
    for i in range(recent_jobs):  # one finished run per job of the last hour
        name, _, _, exec_typ, fail_rate, _ = rng.choices(BACKENDS, [b[2] for b in BACKENDS])[0]
        finished = now - timedelta(seconds=rng.random() * 3600)
        execution = rng.lognormvariate(0, 0.5) * exec_typ
        started = finished - timedelta(seconds=execution)
        enqueued = started - timedelta(seconds=rng.expovariate(1 / 0.4))
        state = "failed" if rng.random() < fail_rate else "succeeded"
        aggregates.record(
            pipe,
            RunFacts(
                job_id=str(i),
                queue="normal",
                state=state,
                backend=name,
                policy="default",
                enqueued_at=enqueued,
                started_at=started,
                finished_at=finished,
                prompt_tokens=100,
                completion_tokens=50,
                cost=Decimal("0.0001"),
                attempts=[AttemptFacts(1, name, state, "", execution, started, finished)],
            ),
        )
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    for name, _, _, exec_typ, fail_rate, _ in BACKENDS:
        for _ in range(200):
            ok = rng.random() >= fail_rate
            stats.record_call(name, latency_ms=exec_typ * 1000, ok=ok, error="" if ok else "HTTP 503 upstream busy")
    stamp = now.isoformat()
    for i in range(6):
        publish(
            WorkerReport(
                f"api-{i}",
                "api-host",
                100 + i,
                ["high", "normal", "low"],
                "busy",
                5,
                8,
                1000,
                started_at=stamp,
                updated_at=stamp,
            )
        )
    for i in range(2):
        publish(
            WorkerReport(
                f"gpu-{i}",
                "gpu-host",
                200 + i,
                ["gpu-high", "gpu-normal"],
                "busy",
                64,
                64,
                9000,
                started_at=stamp,
                updated_at=stamp,
            )
        )
        client.hset(
            STATUS_KEY.format(name=f"gpu-{i}"), mapping={"models": "[]", "batch_size": 64, "tokens_per_s": 4321}
        )
    pipe = client.pipeline(transaction=False)
    for i in range(300):
        queue = ("high", "normal", "low", "gpu-normal")[i % 4]
        get_queue(queue).enqueue_call(TASK, args=(str(uuid.uuid4()),), job_id=str(uuid.uuid4()), pipeline=pipe)
    pipe.execute()
    filler = args.redis_filler if args.redis_filler is not None else 2 * recent_jobs
    pipe = client.pipeline(transaction=False)
    for i in range(filler):  # the status mirror and RQ job hashes of the hour's jobs: keys the SCANs walk past
        pipe.set(f"llmo:bench-filler:{i}", "x", ex=3600)
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    print(f"redis: {recent_jobs:,} finished runs aggregated, {filler:,} filler keys, {client.dbsize():,} keys in all")


# --- timing ---------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def time_urls(n: int) -> dict[str, list[float]]:
    from django.contrib.auth import get_user_model
    from django.db import connection, reset_queries
    from django.test import Client

    user, _ = get_user_model().objects.get_or_create(
        username="bench", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(user)
    out: dict[str, list[float]] = {}
    for url in ("/admin/dashboard/", "/admin/dashboard/panels/"):
        for _ in range(3):  # warm-up: templates, Lua scripts, connections
            assert client.get(url).status_code == 200
        times = []
        for _ in range(n):
            started = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200, response.status_code
        out[url] = times
    # One more, counting queries (DEBUG-style logging for this request only), and a look at the figures.
    connection.force_debug_cursor = True
    reset_queries()
    client.get("/admin/dashboard/panels/")
    print(f"SQL queries per refresh: {len(connection.queries)}")
    connection.force_debug_cursor = False
    data = client.get("/admin/dashboard/data/").json()
    print(
        f"figures: {len(data['recent'])} recent jobs, routed last hour {data['routing']}, "
        f"{len(data['latency'])} backends with latency, {len(data['workers'])} workers, "
        f"queues {[(q['name'], q['depth']) for q in data['queues']]}"
    )
    return out


def explain(now: datetime) -> None:
    """The plan of the only query that reads a range of jobs (routing, last hour) and of 'recent jobs'."""
    from django.db import connection
    from django.db.models import Count

    from jobs.models import Job

    routing = (
        Job.objects.filter(created_at__gte=now - timedelta(hours=1))
        .order_by()
        .values_list("policy_name", "backend_name")
        .annotate(n=Count("*"))
    )
    recent = Job.objects.order_by("-created_at").values_list("id", "state", "priority", "backend_name", "created_at")[
        :20
    ]
    for label, qs in (("routing, last hour", routing), ("recent jobs", recent)):
        sql, params = qs.query.sql_with_params()
        prefix = "EXPLAIN (ANALYZE, BUFFERS) " if connection.vendor == "postgresql" else "EXPLAIN QUERY PLAN "
        with connection.cursor() as cursor:
            cursor.execute(prefix + sql, params)
            plan = [" ".join(str(c) for c in row) for row in cursor.fetchall()]
        print(f"plan ({label}):\n  " + "\n  ".join(plan))


def main() -> None:
    args = parse_args()
    db_url = os.environ.get("DATABASE_URL", "")
    tmp = tempfile.mkdtemp(prefix="llmo-dashbench-")  # SQLite file (unless PostgreSQL), static root
    created = False
    if db_url.startswith("postgres"):
        created = prepare_database(db_url, reuse=args.reuse)
    elif args.reuse:
        sys.exit("--reuse needs a PostgreSQL DATABASE_URL (the SQLite file lives in a temporary folder)")
    else:
        db_url = f"sqlite:///{tmp}/bench.sqlite3"
    os.environ.update(
        DATABASE_URL=db_url,
        REDIS_URL=args.redis_url,
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings",
        LOG_LEVEL="WARNING",
        VAR_DIR=tmp,
        STATIC_ROOT=tmp,
        # DEBUG on only while Django loads: static files from the app directories (no collectstatic run),
        # a dev key; the test client's host name. DEBUG itself is switched off below, before timing.
        DEBUG="1",
        ALLOWED_HOSTS="testserver",
        WORKER_LEASE_TTL_MS="3600000",  # nobody beats for the fake workers: keep them listed while timing
    )
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from orchestrator_site.redis import redis_client
    from routing import policies
    from routing.models import Backend, RoutingPolicy

    settings.DEBUG = False  # no per-query logging while timing
    client = redis_client()
    if client.connection_pool.connection_kwargs.get("db", 0) == 0:
        sys.exit("refusing to flush Redis db 0: pass --redis-url with another database")
    client.flushdb()
    now = datetime.now(UTC)
    try:
        call_command("migrate", verbosity=0)
        ids = {}
        for name, kind, *_, pool in BACKENDS:
            b, _ = Backend.objects.get_or_create(
                name=name, defaults={"kind": kind, "pool": pool, "base_url": "http://llm:8000", "max_concurrency": 32}
            )
            ids[name] = b.pk
        if not RoutingPolicy.objects.filter(name="default").exists():
            RoutingPolicy.objects.create(name="cheap", strategy="ordered", params={"order": ["dev"]})
            policies.activate(
                RoutingPolicy.objects.create(name="default", strategy="ordered", params={"order": list(ids)})
            )
        from jobs.models import Job

        if not args.reuse:
            load_jobs(args, now, ids)
        rows = Job.objects.count()
        recent_jobs = Job.objects.filter(created_at__gte=now - timedelta(hours=1)).count()
        vendor = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
        print(f"{rows:,} jobs in {vendor}, {recent_jobs:,} in the last hour")
        fill_redis(args, now, recent_jobs)
        explain(now)
        results = time_urls(args.requests)
        print(f"\n{args.requests} requests per URL, Django test client (full middleware, staff session):")
        for url, times in results.items():
            p50, p95 = statistics.median(times), percentile(times, 0.95)
            print(f"  {url:28} p50 {p50:7.1f} ms   p95 {p95:7.1f} ms   max {max(times):7.1f} ms")
        worst = max(percentile(t, 0.95) for t in results.values())
        print(f"\ngoal p95 < 300 ms: {'PASS' if worst < 300 else 'FAIL'} (worst p95 {worst:.1f} ms)")
    finally:
        client.flushdb()
        from django.db import connections

        connections.close_all()
        if created and not args.keep:
            drop_database(db_url)
            print("dropped the benchmark database")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
