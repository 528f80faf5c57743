#!/usr/bin/env python3
"""P3 and P5: what one `manage.py rqworker` process drains, against ideal and against raw RQ, in one run.

    .venv/bin/python bench/p3_p5_workers.py [--p3-jobs 1000] [--p5-jobs 2000] [--rounds 3] [--json out.json]

All in a temporary directory removed at the end; SQLite there (or ``--database-url``), Redis db 14
(flushed before, between and after runs; no other db is touched); ``DEBUG=0``.

* **P3 (I/O-bound jobs in flight):** ``--p3-jobs`` jobs on the ``dev`` backend with 100 ms latency
  (``max_concurrency`` 64) are submitted through the real ``POST /jobs`` path, then one worker
  process with ``MAX_CONCURRENCY=32`` drains them (``--burst``). Jobs/s = jobs ÷ (last
  ``finished_at`` − first ``started_at``), the median of ``--rounds`` rounds (single runs vary by
  a few percent here), divided by the ideal 32 ÷ 0.1 s = 320/s. Goal >= 0.9.
  For contrast, plain RQ (its forking ``Worker``, one job at a time) runs ``--rq-jobs`` jobs that
  sleep 100 ms (RQ's own timestamps), as a ratio of the same ideal.
* **P5 (per-job overhead):** ``--p5-jobs`` no-op jobs (``dev`` backend, 0 ms) through our worker
  (claim, attempt rows, result, status mirror, live figures, RQ bookkeeping: all the writes) vs raw
  RQ's ``SimpleWorker`` draining as many no-op function calls on the same Redis; rounds alternate
  and the report takes medians. Goal: ours >= 0.5 of raw.

With ``--tenants N`` (N >= 2) the run compares fair-queue layouts instead: each round drains the same P3
(and P5) jobs once all of one tenant and once spread evenly over N tenants (each tenant's jobs queued
one after the other, so all are backlogged), alternating; the report gives the medians and
N tenants ÷ one tenant (goal >= 0.95). Those jobs are made in bulk without HTTP (``bench/backlog.py``:
``POST /jobs`` does not assign tenants), in both arms alike.

Exit status: 0 PASS, 1 FAIL, 2 could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIS_DB = 14  # unless --redis-db
P3_CONCURRENCY = 32
P3_LATENCY_MS = 100
P3_IDEAL = P3_CONCURRENCY / (P3_LATENCY_MS / 1000)
GOAL_P3 = 0.9
GOAL_P5 = 0.5
GOAL_TENANTS = 0.95


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--p3-jobs", type=int, default=1000)
    p.add_argument("--p5-jobs", type=int, default=2000)
    p.add_argument("--rq-jobs", type=int, default=40, help="plain-RQ contrast jobs for P3 (default 40)")
    p.add_argument("--p5-concurrency", type=int, default=0, help="MAX_CONCURRENCY for P5 (default: the setting's)")
    p.add_argument("--rounds", type=int, default=3, help="P3 rounds, and P5 rounds alternating (default 3)")
    p.add_argument("--only", choices=["p3", "p5"], help="run one of the two")
    p.add_argument("--tenants", type=int, default=0, help="N >= 2: N tenants backlogged against one, per round")
    p.add_argument("--redis-db", type=int, default=REDIS_DB)
    p.add_argument("--database-url", default="", help="default: SQLite in the temporary directory")
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--json", dest="json_path")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmo-bench-workers-"))
    redis_url = f"redis://{args.redis_host}:{args.redis_port}/{args.redis_db}"
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY_FILE", "DATABASE_URL", "MAX_CONCURRENCY")}
    env.update(
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings",
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="testserver,localhost",
        DATABASE_URL=args.database_url or f"sqlite:///{tmp / 'bench.sqlite3'}",
        REDIS_URL=redis_url,
        VAR_DIR=str(tmp),
        LOG_LEVEL="ERROR",
        RECONCILE_INTERVAL_MS="0",  # no reconcile pass inside the measured window
        PYTHONPATH=str(ROOT),
    )
    os.environ.update(env)
    sys.path.insert(0, str(ROOT))
    try:
        import django

        django.setup()
        return Bench(args, env, tmp).run()
    finally:
        try:
            from orchestrator_site.redis import redis_client

            redis_client().flushdb()
        except Exception:
            pass
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


class Bench:
    def __init__(self, args: argparse.Namespace, env: dict[str, str], tmp: Path) -> None:
        self.args, self.env, self.tmp = args, env, tmp

    # --- set-up -----------------------------------------------------------------------------------
    def run(self) -> int:
        from django.core.management import call_command

        from orchestrator_site.redis import redis_client

        redis_client().flushdb()
        call_command("migrate", verbosity=0)
        self.user = self.make_user()
        if self.args.tenants >= 2:
            return self.tenants_run()
        skip = {"p3": "p5", "p5": "p3"}.get(self.args.only or "")
        p3 = self.p3() if skip != "p3" else {"jobs": 0, "jobs_per_s": 0, "ideal": P3_IDEAL, "ratio": 0}
        rq_plain = self.rq_plain_p3() if skip != "p3" else 0.0
        p5 = (
            self.p5()
            if skip != "p5"
            else {
                "jobs": 0,
                "concurrency": 0,
                "ours_jobs_per_s": 0,
                "raw_jobs_per_s": 0,
                "ours_rounds": [],
                "raw_rounds": [],
                "ratio": 0,
            }
        )
        report = {
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}",
            "database": "sqlite" if not self.args.database_url else "postgresql",
            "p3": {**p3, "rq_plain_jobs_per_s": rq_plain, "rq_plain_ratio": round(rq_plain / P3_IDEAL, 3)},
            "p5": p5,
        }
        p3_ok = p3["ratio"] >= GOAL_P3
        p5_ok = p5["ratio"] >= GOAL_P5
        print(f"\nP3  {p3['jobs']} jobs, dev {P3_LATENCY_MS} ms, MAX_CONCURRENCY={P3_CONCURRENCY}, one process")
        print(
            f"    ours {p3['jobs_per_s']:.1f} jobs/s (median of rounds {p3.get('rounds', [])})"
            f" vs ideal {P3_IDEAL:.0f}/s -> ratio {p3['ratio']:.3f}"
        )
        print(f"    {p3.get('cpu', '')}")
        print(f"    plain RQ (fork per job, one at a time) {rq_plain:.1f} jobs/s -> ratio {rq_plain / P3_IDEAL:.3f}")
        print(f"    goal >= {GOAL_P3}: {'PASS' if p3_ok else 'FAIL'}")
        print(f"P5  {p5['jobs']} no-op jobs, one process, MAX_CONCURRENCY={p5['concurrency']}, medians of rounds")
        print(f"    ours {p5['ours_jobs_per_s']:.1f} jobs/s (rounds {p5['ours_rounds']})")
        print(f"    raw RQ SimpleWorker {p5['raw_jobs_per_s']:.1f} jobs/s (rounds {p5['raw_rounds']})")
        print(f"    ratio {p5['ratio']:.3f}; goal >= {GOAL_P5}: {'PASS' if p5_ok else 'FAIL'}")
        if self.args.json_path:
            Path(self.args.json_path).write_text(json.dumps(report, indent=2))
        return 0 if p3_ok and p5_ok else 1

    def make_user(self):
        from django.contrib.auth import get_user_model

        user, _ = get_user_model().objects.get_or_create(username="bench")  # a reused --database-url has it
        return user

    def reset(self, latency_ms: int):
        """An empty queue, a clean job table, and the one ``dev`` backend at ``latency_ms``."""
        from jobs.models import Job
        from orchestrator_site.redis import redis_client
        from routing import policies
        from routing.models import Backend, BackendKind, RoutingPolicy

        redis_client().flushdb()
        Job.objects.all().delete()
        backend, _ = Backend.objects.update_or_create(
            name="dev",
            defaults={"kind": BackendKind.DEV, "config": {"latency_ms": latency_ms}, "max_concurrency": 64},
        )
        if not RoutingPolicy.objects.filter(is_active=True).exists():
            policies.activate(RoutingPolicy.objects.create(name="bench", strategy="ordered", params={}))
        return backend

    def submit(self, n: int) -> None:
        """``n`` jobs through the real POST /jobs (validation, routing, idempotency-free enqueue)."""
        from django.test import Client

        client = Client()
        client.force_login(self.user)
        for i in range(n):
            r = client.post("/jobs", {"prompt": f"job {i}"}, content_type="application/json")
            if r.status_code != 202:
                raise SystemExit(f"submission failed: {r.status_code} {r.content[:300]!r}")

    def drain(self, concurrency: int) -> float:
        """One burst worker process drains the queues; returns jobs/s over the first start..last finish."""
        from django.db.models import Max, Min

        from jobs.models import Job, JobState

        cmd = [sys.executable, "manage.py", "rqworker", "high", "normal", "low", "--burst"]
        env = {**self.env, "MAX_CONCURRENCY": str(concurrency)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        self.last_cpu = f"worker process: {cpu:.1f} s CPU in {time.monotonic() - started:.1f} s (start-up included)"
        jobs = Job.objects.all()
        n = jobs.count()
        done = jobs.filter(state=JobState.SUCCEEDED).count()
        if done != n:
            raise SystemExit(f"{n - done} of {n} jobs did not succeed")
        span = jobs.aggregate(a=Min("started_at"), b=Max("finished_at"))
        return n / (span["b"] - span["a"]).total_seconds()

    # --- N tenants against one -------------------------------------------------------------------
    def tenants_run(self) -> int:
        from django.conf import settings

        from bench import backlog
        from tenants.models import Tenant

        Tenant.objects.all().delete()
        tenants = [backlog.tenant(f"t{i}") for i in range(self.args.tenants)]
        benches = {
            "p3": (P3_LATENCY_MS, self.args.p3_jobs, P3_CONCURRENCY),
            "p5": (0, self.args.p5_jobs, self.args.p5_concurrency or settings.MAX_CONCURRENCY),
        }
        if self.args.only:
            benches = {self.args.only: benches[self.args.only]}
        report, ok = {}, True
        for name, (latency, jobs, concurrency) in benches.items():
            rates: dict[int, list[float]] = {1: [], len(tenants): []}
            for _ in range(self.args.rounds):
                for arm in rates:
                    backend = self.reset(latency)
                    for i in range(arm):
                        n = jobs // arm + (1 if i < jobs % arm else 0)
                        backlog.create_jobs(n, backend, owner=self.user, tenant=tenants[i], label=f"t{i}")
                    rates[arm].append(self.drain(concurrency))
            one, many = statistics.median(rates[1]), statistics.median(rates[len(tenants)])
            report[name] = {
                "jobs": jobs,
                "concurrency": concurrency,
                "one_tenant_jobs_per_s": round(one, 1),
                "tenants_jobs_per_s": round(many, 1),
                "one_tenant_rounds": [round(r, 1) for r in rates[1]],
                "tenants_rounds": [round(r, 1) for r in rates[len(tenants)]],
                "ratio": round(many / one, 3),
            }
            ok = ok and many / one >= GOAL_TENANTS
        print(f"\n{len(tenants)} tenants backlogged vs one tenant, same jobs, rounds alternating, medians")
        for name, r in report.items():
            print(
                f"{name.upper()}  {r['jobs']} jobs, MAX_CONCURRENCY={r['concurrency']}: one tenant"
                f" {r['one_tenant_jobs_per_s']} jobs/s (rounds {r['one_tenant_rounds']}), {len(tenants)} tenants"
                f" {r['tenants_jobs_per_s']} jobs/s (rounds {r['tenants_rounds']}) -> ratio {r['ratio']:.3f};"
                f" goal >= {GOAL_TENANTS}: {'PASS' if r['ratio'] >= GOAL_TENANTS else 'FAIL'}"
            )
        if self.args.json_path:
            Path(self.args.json_path).write_text(json.dumps({"tenants": len(tenants), **report}, indent=2))
        return 0 if ok else 1

    # --- P3 ---------------------------------------------------------------------------------------
    def p3(self) -> dict:
        rates, cpu = [], []
        for _ in range(self.args.rounds):
            self.reset(P3_LATENCY_MS)
            self.submit(self.args.p3_jobs)
            rates.append(self.drain(P3_CONCURRENCY))
            cpu.append(self.last_cpu)
        rate = statistics.median(rates)
        return {
            "jobs": self.args.p3_jobs,
            "jobs_per_s": round(rate, 1),
            "rounds": [round(r, 1) for r in rates],
            "ideal": P3_IDEAL,
            "ratio": round(rate / P3_IDEAL, 3),
            "cpu": cpu[rates.index(rate)] if rate in rates else cpu[-1],
        }

    def rq_plain_p3(self) -> float:
        """Plain RQ: the forking Worker, a function that sleeps 100 ms."""
        return self.raw_rq("bench.rq_tasks.sleep_100ms", self.args.rq_jobs, worker_class="rq.worker.Worker")

    # --- P5 ---------------------------------------------------------------------------------------
    def p5(self) -> dict:
        from django.conf import settings

        concurrency = self.args.p5_concurrency or settings.MAX_CONCURRENCY
        ours, raw = [], []
        for _ in range(self.args.rounds):
            raw.append(self.raw_rq("bench.rq_tasks.noop", self.args.p5_jobs, worker_class="rq.worker.SimpleWorker"))
            self.reset(0)
            self.submit(self.args.p5_jobs)
            ours.append(self.drain(concurrency))
        o, r = statistics.median(ours), statistics.median(raw)
        return {
            "jobs": self.args.p5_jobs,
            "concurrency": concurrency,
            "ours_jobs_per_s": round(o, 1),
            "raw_jobs_per_s": round(r, 1),
            "ours_rounds": [round(x, 1) for x in ours],
            "raw_rounds": [round(x, 1) for x in raw],
            "ratio": round(o / r, 3),
        }

    def raw_rq(self, func: str, n: int, *, worker_class: str) -> float:
        """Raw RQ on the same Redis: enqueue ``n`` calls of ``func``, drain with ``rq worker --burst``."""
        from redis import Redis
        from rq import Queue

        conn = Redis.from_url(self.env["REDIS_URL"])
        conn.flushdb()
        queue = Queue("raw", connection=conn)
        with conn.pipeline() as pipe:
            jobs = [queue.enqueue(func, pipeline=pipe) for _ in range(n)]
            pipe.execute()
        cmd = [
            sys.executable,
            "-m",
            "rq.cli",
            "worker",
            "raw",
            "--burst",
            "-w",
            worker_class,
            "-u",
            self.env["REDIS_URL"],
        ]
        subprocess.run(cmd, cwd=ROOT, env=self.env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for job in jobs:
            job.refresh()
        if any(job.get_status() != "finished" for job in jobs):
            raise SystemExit("raw RQ jobs did not all finish")
        first = min(job.started_at for job in jobs)
        last = max(job.ended_at for job in jobs)
        conn.flushdb()
        return n / (last - first).total_seconds()


if __name__ == "__main__":
    t0 = time.monotonic()
    code = main()
    print(f"(took {time.monotonic() - t0:.0f} s)")
    sys.exit(code)
