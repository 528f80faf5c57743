#!/usr/bin/env python3
"""Queue expiry: jobs that wait past their queue timeout behind a long backlog end ``expired`` in time,
without running.

    .venv/bin/python bench/expiry.py [--backlog 3000] [--reconcile-ms 5000] [--redis-db 14] [--database-url …]

One ``manage.py rqworker high normal low`` (``MAX_CONCURRENCY=4``, ``RECONCILE_INTERVAL_MS`` as given)
is started and busy with ``--backlog`` jobs of one tenant (``dev`` backend, 50 ms: about 80 jobs/s,
so far longer than the timeout); then the same tenant queues 100 jobs with ``queue_timeout_s=1``
behind them. Reported: how long after submission each of the 100 ended (``finished_at`` −
``created_at``), against queue_timeout_s + one reconcile interval, and that none ran: no attempt
(no backend call), no start, no worker. Jobs are made in bulk without HTTP (``bench/backlog.py``).
Exit status 0 PASS, 1 FAIL.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import backlog  # noqa: E402

LATENCY_MS = 50
TIMEOUT_S = 1
N_EXPIRING = 100


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backlog", type=int, default=3000)
    p.add_argument("--reconcile-ms", type=int, default=5000, help="RECONCILE_INTERVAL_MS of the worker")
    p.add_argument("--redis-db", type=int, default=14)
    p.add_argument("--database-url", default="")
    p.add_argument("--json", dest="json_path")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    t0 = time.monotonic()
    with backlog.site(args.redis_db, args.database_url, RECONCILE_INTERVAL_MS=str(args.reconcile_ms)) as env:
        from jobs.models import Job, JobAttempt, JobState

        dev = backlog.reset(LATENCY_MS)
        owner = backlog.user()
        a = backlog.tenant("a")
        with backlog.workers(env, 1, MAX_CONCURRENCY="4"):
            head = backlog.create_jobs(args.backlog, dev, owner=owner, tenant=a, label="backlog")
            backlog.wait_until(lambda: Job.objects.filter(pk=head[0]).exclude(state=JobState.QUEUED).exists(), 60)
            late = backlog.create_jobs(N_EXPIRING, dev, owner=owner, tenant=a, queue_timeout_s=TIMEOUT_S, label="late")
            rows = Job.objects.filter(pk__in=late)
            waited = backlog.wait_until(
                lambda: not rows.filter(state=JobState.QUEUED).exists(), TIMEOUT_S + 3 * args.reconcile_ms / 1000 + 30
            )
            backlog_started = Job.objects.filter(pk__in=head).exclude(state=JobState.QUEUED).count()
        ended = [(j.finished_at - j.created_at).total_seconds() for j in rows if j.finished_at]
        states = sorted({j.state for j in rows})
        ran = (
            rows.exclude(attempt_count=0).count()
            + rows.exclude(started_at=None).count()
            + rows.exclude(worker="").count()
        )
        attempts = JobAttempt.objects.filter(job__in=late).count()
    bound = TIMEOUT_S + args.reconcile_ms / 1000
    worst = max(ended) if ended else float("inf")
    ok = states == [JobState.EXPIRED] and len(ended) == N_EXPIRING and worst <= bound and ran == 0 and attempts == 0
    print(f"\nExpiry: {N_EXPIRING} jobs with queue_timeout_s={TIMEOUT_S} behind {args.backlog} jobs of the same tenant")
    print(f"  one worker, MAX_CONCURRENCY=4, dev {LATENCY_MS} ms, RECONCILE_INTERVAL_MS={args.reconcile_ms}")
    print(f"  states of the {N_EXPIRING}: {states}; backlog jobs started meanwhile: {backlog_started}")
    print(
        f"  ended after submission: min {min(ended):.2f} s, median {statistics.median(ended):.2f} s,"
        f" max {worst:.2f} s  (bound: queue_timeout_s + one reconcile interval = {bound:.1f} s)"
    )
    print(f"  ran: {ran} (started, attempted or claimed), attempts (backend calls): {attempts}")
    print(f"  all expired within the bound, none ran: {'PASS' if ok else 'FAIL'}  (waited {waited:.1f} s)")
    if args.json_path:
        report = {
            "expired": len(ended),
            "states": states,
            "min_s": min(ended),
            "median_s": statistics.median(ended),
            "max_s": worst,
            "bound_s": bound,
            "ran": ran,
            "attempts": attempts,
            "pass": ok,
        }
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    print(f"(took {time.monotonic() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
