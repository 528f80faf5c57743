#!/usr/bin/env python3
"""A worker's resident memory over many jobs: is it flat, and if not, what grows.

    .venv/bin/python bench/worker_rss.py [--rounds 20] [--jobs 2000] [--debug] [--tracemalloc]
                                         [--database-url postgres://…/<own db>] [--json out.json]

One ``manage.py rqworker high normal low`` (``DEBUG=0`` unless ``--debug``) on a throw-away site
(``bench/backlog.py``: SQLite, or ``--database-url``; Redis db 13) drains ``--rounds`` rounds of
``--jobs`` jobs spread over three ``dev`` backends as the fleet soak uses them (fast 0 ms, slower
20 ms, flaky 10 ms with 5 % of calls answering 503 and retried). After each round the worker's
``VmRSS`` is read. The report gives the curve, the growth from the end of the warm-up (the first
quarter of the rounds) to the end, and the growth per 1,000 jobs after it.

``--tracemalloc`` starts the worker under ``tracemalloc`` (``bench/_traced_worker.py``), which writes a
snapshot after each round; the report lists the 15 source lines whose allocations grew most between
the end of the warm-up and the end. Slower (tracing costs), so use it to find a cause, not to measure.

Exit status: 0 when RSS after the warm-up grows by at most 10 %, 1 otherwise, 2 could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import backlog  # noqa: E402

REDIS_DB = 13
BACKENDS = {
    "fast": {"latency_ms": 0},
    "slower": {"latency_ms": 20},
    "flaky": {"latency_ms": 10, "fail_rate": 0.05, "fail_status": 503},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2000, help="jobs a round")
    p.add_argument("--debug", action="store_true", help="run the worker with DEBUG=1")
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--database-url", default="")
    p.add_argument("--json", type=Path)
    return p.parse_args()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def make_backends() -> list:
    from routing import policies
    from routing.models import Backend, BackendKind, RoutingPolicy

    backlog.reset(0).delete()
    Backend.objects.filter(name__in=BACKENDS).delete()  # a previous run's, on a kept database
    made = [
        Backend.objects.create(name=name, kind=BackendKind.DEV, config=config, max_concurrency=64)
        for name, config in BACKENDS.items()
    ]
    if not RoutingPolicy.objects.filter(is_active=True).exists():
        policies.activate(RoutingPolicy.objects.create(name="bench", strategy="ordered", params={}))
    return made


def top_growth(first: Path, last: Path, n: int = 15) -> list[str]:
    import tracemalloc

    before = tracemalloc.Snapshot.load(str(first))
    after = tracemalloc.Snapshot.load(str(last))
    stats = after.compare_to(before, "lineno")
    return [str(s) for s in stats[:n]]


def main() -> int:
    args = parse_args()
    snaps = Path(tempfile.mkdtemp(prefix="llmo-rss-"))
    extra = {"DEBUG": "1"} if args.debug else {}
    with backlog.site(REDIS_DB, args.database_url, **extra) as env:
        from jobs.models import Job, JobState

        backends = make_backends()
        terminal = [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED, JobState.EXPIRED]
        argv = [sys.executable, "manage.py", "rqworker", "high", "normal", "low"]
        if args.tracemalloc:
            argv = [sys.executable, "bench/_traced_worker.py", "rqworker", "high", "normal", "low"]
            env = {**env, "TRACED_WORKER_SNAPSHOTS": str(snaps)}
        proc = subprocess.Popen(argv, cwd=backlog.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        curve: list[dict] = []
        try:
            done = failed = 0
            for n in range(args.rounds):
                t0 = time.monotonic()
                for i, backend in enumerate(backends):
                    share = args.jobs // len(backends) + (1 if i < args.jobs % len(backends) else 0)
                    backlog.create_jobs(share, backend, label=f"r{n}")
                done += args.jobs
                backlog.wait_until(lambda: Job.objects.exclude(state__in=terminal).count() == 0, 600, 0.5)
                if args.tracemalloc:
                    os.kill(proc.pid, signal.SIGUSR1)
                    backlog.wait_until(lambda n=n: (snaps / f"{n}.snap").exists(), 120, 0.2)
                kb = rss_kb(proc.pid)
                curve.append({"round": n + 1, "jobs": done, "rss_mb": round(kb / 1024, 1), "s": time.monotonic() - t0})
                print(f"round {n + 1:3d}  jobs {done:7d}  RSS {kb / 1024:7.1f} MiB  ({time.monotonic() - t0:.1f} s)")
                failed += Job.objects.filter(state=JobState.FAILED).count()
                Job.objects.all().delete()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    warm = max(1, args.rounds // 4)
    base, end = curve[warm - 1], curve[-1]
    growth = (end["rss_mb"] - base["rss_mb"]) / base["rss_mb"]
    per_1k = (end["rss_mb"] - base["rss_mb"]) / ((end["jobs"] - base["jobs"]) / 1000) if end != base else 0.0
    report = {
        "debug": args.debug,
        "database": "postgresql" if args.database_url else "sqlite",
        "jobs_a_round": args.jobs,
        "curve": curve,
        "after_warmup_growth_pct": round(100 * growth, 1),
        "mib_per_1000_jobs_after_warmup": round(per_1k, 3),
        "failed_jobs": failed,
    }
    if args.tracemalloc and curve:
        report["top_growth"] = top_growth(snaps / f"{warm - 1}.snap", snaps / f"{len(curve) - 1}.snap")
        print("\n".join(report["top_growth"]))
    print(json.dumps({k: v for k, v in report.items() if k not in ("curve", "top_growth")}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if growth <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
