#!/usr/bin/env python3
"""Retention at scale: purge 900 k of 1 M finished jobs on PostgreSQL while clients keep submitting.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/<db> .venv/bin/python bench/purge_1m.py \\
        [--jobs 1000000] [--old 900000] [--clients 2] [--baseline-s 20] [--redis-db 13] [--keep]

1. ``migrate`` the database, ``bootstrap_demo`` for a token, then generate ``--jobs`` finished jobs
   in one ``INSERT … SELECT generate_series`` (``--old`` of them 31-120 days old, the rest younger
   than 30 days), one attempt each, and 1 % of them linked to one of 100 shared images;
2. start ``gunicorn -w 2``; ``--clients`` threads submit ``POST /jobs`` back to back, timing each:
   first ``--baseline-s`` seconds with nothing else running, then throughout
   ``manage.py purge_jobs --older-than 30`` (timed), then as long again after it;
3. report the purge's wall time and output, and per phase the submissions' count, median, p99 and
   max latency; then delete every job (``TRUNCATE``) unless ``--keep``.

The goal: no ``POST /jobs`` slower than 100 ms while the purge runs. Redis db ``--redis-db`` is
flushed before and after (nothing else is touched). The database named by DATABASE_URL is the
bench's own: its job tables are emptied at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent

GENERATE = """
INSERT INTO jobs_job (
    id, state, priority, version, prompt, messages, requires_multimodal, model, requested_backend,
    params, metadata, timeout_s, request_fingerprint, backend_name, policy_name, routing, queue, rq_job_id,
    output, finish_reason, error, prompt_tokens, completion_tokens, attempt_count, worker,
    created_at, enqueued_at, started_at, finished_at, updated_at, trace_id, image_count
)
SELECT
    md5(n::text || 'job')::uuid,
    (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed', 'canceled'])[1 + n %% 5],
    'normal', 3, 'prompt number ' || n, '[]', false, 'dev-model', '', '{}', '{}', 60, '', 'dev', 'default',
    '{"reason": "bench"}', 'normal', md5(n::text || 'job'),
    repeat('output ', 20), 'stop', '', 10, 20, 1, 'bench-worker',
    t, t, t, t + interval '1 second', t + interval '1 second', '', CASE WHEN n %% 100 = 0 THEN 1 ELSE 0 END
FROM (
    SELECT n, CASE WHEN n <= %(old)s
        THEN now() - interval '31 days' - (n %% 89) * interval '1 day' - (n %% 86400) * interval '1 second'
        ELSE now() - (n %% 29) * interval '1 day' - (n %% 86400) * interval '1 second' END AS t
    FROM generate_series(1, %(jobs)s) AS n
) AS s
"""
ATTEMPTS = """
INSERT INTO jobs_jobattempt (job_id, number, backend_name, worker, outcome, error, traceback, latency_ms,
                             started_at, finished_at)
SELECT id, 1, 'dev', 'bench-worker', CASE WHEN state = 'canceled' THEN 'canceled' ELSE state END, '', '', 900,
       started_at, finished_at
FROM jobs_job
"""
IMAGES = """
INSERT INTO jobs_jobimage (sha256, media_type, size, data, created_at)
SELECT md5(i::text || 'a') || md5(i::text || 'b'), 'image/png', 1024, decode(repeat(md5(i::text), 64), 'hex'), now()
FROM generate_series(0, 99) AS i;
INSERT INTO jobs_jobimagelink (job_id, image_id, position)
SELECT id, (SELECT sha256 FROM jobs_jobimage ORDER BY sha256 OFFSET (abs(hashtext(id::text)) %% 100) LIMIT 1), 0
FROM jobs_job WHERE image_count = 1
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1_000_000)
    p.add_argument("--old", type=int, default=900_000)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--baseline-s", type=float, default=20.0)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--pause-ms", type=int, default=0, help="purge_jobs --pause-ms")
    p.add_argument("--redis-db", type=int, default=13)
    p.add_argument("--keep", action="store_true", help="leave the jobs in the database")
    p.add_argument("--json", type=Path)
    return p.parse_args()


def summary(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": 1000 * ordered[-1],
        "over_100ms": sum(1 for s in ordered if s > 0.1),
    }


def main() -> int:
    args = parse_args()
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        print("set DATABASE_URL to the bench's own PostgreSQL database", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="llmo-purgebench-"))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings",
        "REDIS_URL": f"redis://127.0.0.1:6379/{args.redis_db}",
        "VAR_DIR": str(tmp),
        "DEBUG": "0",
        "SECRET_KEY": "purge-bench-secret-key-not-for-production-0123456789",
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "JOB_RETENTION_DAYS": "0",  # only the command purges
    }
    py = sys.executable
    subprocess.run(["redis-cli", "-n", str(args.redis_db), "flushdb"], capture_output=True)
    subprocess.run([py, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    boot = subprocess.run(
        [py, "manage.py", "bootstrap_demo", "--json"], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    token = json.loads(boot.stdout.strip().splitlines()[-1])["token"]
    server = None
    report: dict[str, object] = {}
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("TRUNCATE jobs_jobimagelink, jobs_jobimage, jobs_jobattempt, jobs_job")
            started = time.perf_counter()
            conn.execute(GENERATE, {"jobs": args.jobs, "old": args.old})
            conn.execute(ATTEMPTS)
            for statement in IMAGES.split(";"):
                conn.execute(statement.replace("%%", "%"))
            conn.execute("VACUUM ANALYZE jobs_job")
            conn.execute("VACUUM ANALYZE jobs_jobattempt")
            report["generate_s"] = round(time.perf_counter() - started, 1)
            print(f"generated {args.jobs} jobs + attempts + image links in {report['generate_s']} s", flush=True)

        port = 18000 + os.getpid() % 1000
        base = f"http://127.0.0.1:{port}"
        log = open(tmp / "gunicorn.log", "w")  # noqa: SIM115 (closed with the process)
        server = subprocess.Popen(
            [py, "-m", "gunicorn", "orchestrator_site.wsgi", "-w", "2", "-b", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        phase = ["starting"]
        samples: dict[str, list[float]] = {"baseline": [], "purge": [], "after": []}
        errors: list[str] = []
        stop = threading.Event()

        def client(i: int) -> None:
            body = json.dumps({"prompt": f"client {i} says hello", "max_tokens": 8}).encode()
            while not stop.is_set():
                req = urllib.request.Request(f"{base}/jobs", data=body, method="POST")
                req.add_header("Authorization", f"Token {token}")
                req.add_header("Content-Type", "application/json")
                t0 = time.perf_counter()
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        resp.read()
                        ok = resp.status == 202
                except OSError as exc:
                    errors.append(str(exc))
                    time.sleep(0.2)
                    continue
                elapsed = time.perf_counter() - t0
                if ok and phase[0] in samples:
                    samples[phase[0]].append(elapsed)

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError((tmp / "gunicorn.log").read_text()) from None
                time.sleep(0.2)
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(2)  # warm-up, not measured
        phase[0] = "baseline"
        time.sleep(args.baseline_s)
        phase[0] = "purge"
        started = time.perf_counter()
        purge = subprocess.run(
            [py, "manage.py", "purge_jobs", "--older-than", "30", "--batch-size", str(args.batch_size)]
            + ["--pause-ms", str(args.pause_ms)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        report["purge_s"] = round(time.perf_counter() - started, 1)
        report["purge_output"] = (purge.stdout + purge.stderr).strip()
        phase[0] = "after"
        time.sleep(args.baseline_s)
        stop.set()
        for t in threads:
            t.join(timeout=35)
        report["submit"] = {name: summary(s) for name, s in samples.items()}
        report["client_errors"] = len(errors)
        with psycopg.connect(url, autocommit=True) as conn:
            report["jobs_left"] = conn.execute("SELECT count(*) FROM jobs_job").fetchone()[0]
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0 if purge.returncode == 0 else 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        if not args.keep:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("TRUNCATE jobs_jobimagelink, jobs_jobimage, jobs_jobattempt, jobs_job")
        subprocess.run(["redis-cli", "-n", str(args.redis_db), "flushdb"], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
