#!/usr/bin/env python3
"""Fair share through real workers: a backlog does not hold back another tenant's new jobs, and
backlogged tenants share dispatches by weight.

    .venv/bin/python bench/fairness.py [--redis-db 14] [--database-url postgres://…] [--json out.json]

* **New tenant behind a backlog:** tenant A queues ``--backlog`` (1,000) ``normal`` jobs, then tenant B
  queues 10; then ``--workers`` (1, then 2) ``manage.py rqworker high normal low`` processes with
  ``MAX_CONCURRENCY=4`` drain them on the ``dev`` backend at 50 ms. Reported: the dispatch index (by
  the claim time) at which B's last job started and at which A's 50th did. Goal: B's last before A's 50th.
* **Weights 3:1, both backlogged:** A (weight 3) and B (weight 1) queue ``--weighted`` (600) jobs each;
  one worker; A's share of the first ``--weighted`` × 2/3 dispatches, while both still wait. Goal 75 ± 5 %.

Jobs are made in bulk without HTTP (``bench/backlog.py``). Exit status 0 PASS, 1 FAIL.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import backlog  # noqa: E402

LATENCY_MS = 50
CONCURRENCY = 4
B_JOBS = 10
A_NTH = 50


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backlog", type=int, default=1000, help="tenant A's jobs before B's (default 1000)")
    p.add_argument("--weighted", type=int, default=600, help="jobs each tenant queues in the 3:1 run")
    p.add_argument("--redis-db", type=int, default=14)
    p.add_argument("--database-url", default="")
    p.add_argument("--json", dest="json_path")
    return p.parse_args()


def drain(env: dict, n_workers: int, ids: list[str]) -> float:
    from jobs.models import Job, JobState

    with backlog.workers(env, n_workers, MAX_CONCURRENCY=str(CONCURRENCY)):
        left = Job.objects.filter(pk__in=ids).exclude(state=JobState.SUCCEEDED)
        took = backlog.wait_until(lambda: not left.exists(), timeout_s=600, every_s=0.5)
    return took


def new_tenant_run(env: dict, n_workers: int, n_backlog: int) -> dict:
    dev = backlog.reset(LATENCY_MS)
    owner = backlog.user()
    a = backlog.create_jobs(n_backlog, dev, owner=owner, tenant=backlog.tenant("a"), label="a")
    b = backlog.create_jobs(B_JOBS, dev, owner=owner, tenant=backlog.tenant("b"), label="b")
    took = drain(env, n_workers, a + b)
    order = backlog.start_order(a + b)
    index = {job: i + 1 for i, job in enumerate(order)}
    b_last = max(index[j] for j in b)
    a_nth = index[a[A_NTH - 1]]
    return {"workers": n_workers, "b_last": b_last, "a_50th": a_nth, "pass": b_last < a_nth, "seconds": round(took, 1)}


def weighted_run(env: dict, n_each: int) -> dict:
    dev = backlog.reset(LATENCY_MS)
    owner = backlog.user()
    heavy = backlog.create_jobs(n_each, dev, owner=owner, tenant=backlog.tenant("a", weight=3), label="a")
    light = backlog.create_jobs(n_each, dev, owner=owner, tenant=backlog.tenant("b", weight=1), label="b")
    drain(env, 1, heavy + light)
    window = n_each * 2 // 3  # A (3 of 4) still has jobs waiting throughout
    first = backlog.start_order(heavy + light)[:window]
    heavy_set = set(heavy)
    share = sum(1 for j in first if j in heavy_set) / len(first)
    return {"dispatches": len(first), "a_share": round(share, 4), "pass": abs(share - 0.75) <= 0.05}


def main() -> int:
    args = parse_args()
    t0 = time.monotonic()
    with backlog.site(args.redis_db, args.database_url) as env:
        runs = [new_tenant_run(env, n, args.backlog) for n in (1, 2)]
        weighted = weighted_run(env, args.weighted)
    print(f"\nFairness: dev {LATENCY_MS} ms, MAX_CONCURRENCY={CONCURRENCY}, dispatch order by claim time")
    print(f"  A queues {args.backlog}, then B queues {B_JOBS}   (goal: B's last starts before A's {A_NTH}th)")
    print("  workers | B's last job started at dispatch | A's 50th at | drained in | result")
    for r in runs:
        print(
            f"  {r['workers']:>7} | {r['b_last']:>32} | {r['a_50th']:>11} | {r['seconds']:>8} s |"
            f" {'PASS' if r['pass'] else 'FAIL'}"
        )
    print(
        f"  weights 3:1, {args.weighted} jobs each, one worker: A had {weighted['a_share'] * 100:.1f} % of the first"
        f" {weighted['dispatches']} dispatches (goal 75 ± 5 %): {'PASS' if weighted['pass'] else 'FAIL'}"
    )
    ok = all(r["pass"] for r in runs) and weighted["pass"]
    if args.json_path:
        report = {"machine": f"{platform.node()}", "new_tenant": runs, "weighted": weighted, "pass": ok}
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    print(f"(took {time.monotonic() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
