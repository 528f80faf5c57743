#!/usr/bin/env python3
"""A batch of N lines through the real server: upload time, time to ``in_progress`` and to every job
created, and the peak memory (VmHWM) of the web process that took the upload.

    .venv/bin/python bench/batch_upload.py [--lines 5000 50000] [--redis-db 14] [--json out.json]

Set-up as bench/p1_submit.py (``server_env``: DEBUG off, SQLite in a temporary directory, Redis db
``--redis-db`` flushed before and after), then one ``gunicorn -w 1`` with uvicorn workers (production's
stack: one web process, so its peak RSS is the upload's) and one ``manage.py rqworker high``, which
runs the batch's ``start`` task (batch tasks go on ``high``) and leaves the lines (``low``) queued, so
running them does not compete for the CPU with the creation being measured. Per size: a fresh JSONL file
(each line a short chat request with a unique ``custom_id``) is uploaded streaming with httpx, the
batch created, and ``GET /v1/batches/<id>`` polled every 50 ms until ``in_progress``; the jobs created
are counted from the rows until all exist. The web process's VmHWM is read after each size (it only
grows: a flat figure across sizes is the goal). Exit status 0, or 2 when it could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.p1_submit import (  # noqa: E402
    BenchError,
    clean_up,
    flush_bench_db,
    free_port,
    manage,
    redis_conn,
    server_env,
    start_gunicorn,
    stop_gunicorn,
    wait_ready,
    worker_pids,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--lines", type=int, nargs="+", default=[5000, 50000])
    p.add_argument("--redis-db", type=int, default=14)
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p.parse_args()


def write_file(path: Path, n: int) -> int:
    with open(path, "w") as out:
        for i in range(n):
            body = {"model": "auto", "messages": [{"role": "user", "content": f"line {i}: say something"}]}
            out.write(
                json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
            )
            out.write("\n")
    return path.stat().st_size


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_size(httpx, base: str, token: str, tmp: Path, db: Path, n: int) -> dict:
    path = tmp / f"batch-{n}.jsonl"
    size = write_file(path, n)
    headers = {"Authorization": f"Bearer {token}"}
    t0 = time.monotonic()
    with open(path, "rb") as fh:
        r = httpx.post(
            f"{base}/v1/files", headers=headers, files={"file": (path.name, fh)}, data={"purpose": "batch"}, timeout=600
        )
    r.raise_for_status()
    upload_s = time.monotonic() - t0
    body = {"input_file_id": r.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    t1 = time.monotonic()
    batch = httpx.post(f"{base}/v1/batches", headers=headers, json=body, timeout=60).json()
    create_ms = (time.monotonic() - t1) * 1000
    while True:
        status = httpx.get(f"{base}/v1/batches/{batch['id']}", headers=headers, timeout=60).json()
        if status["status"] != "validating":
            break
        time.sleep(0.05)
    to_in_progress = time.monotonic() - t1
    if status["status"] != "in_progress":
        raise BenchError(f"batch ended {status['status']}: {status.get('errors')}")
    with sqlite3.connect(db, timeout=30) as conn:
        while conn.execute("SELECT lines_created FROM batches_batch WHERE id = ?", (batch["id"],)).fetchone()[0] < n:
            time.sleep(0.1)
    all_created = time.monotonic() - t1
    return {
        "lines": n,
        "file_bytes": size,
        "upload_s": round(upload_s, 2),
        "create_request_ms": round(create_ms, 1),
        "to_in_progress_s": round(to_in_progress, 2),
        "all_jobs_created_s": round(all_created, 2),
        "jobs_per_s": round(n / (all_created - to_in_progress), 0) if all_created > to_in_progress else None,
    }


def main() -> int:
    args = parse_args()
    try:
        import httpx
    except ImportError:
        print("run with the project venv (.venv/bin/python)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="llmo-bench-batch-"))
    conn = web = worker = None
    rows = []
    try:
        conn = redis_conn(args)
        flush_bench_db(conn)
        env = server_env(args, tmp, RECONCILE_INTERVAL_MS="0")
        manage(env, "migrate", "--noinput", "-v", "0")
        token = json.loads(manage(env, "bootstrap_demo", "--json").strip().splitlines()[-1])["token"]
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        args.workers = 1
        web = start_gunicorn(args, env, port, tmp / "gunicorn.log")
        wait_ready(web, base, tmp / "gunicorn.log")
        (web_pid,) = worker_pids(web.pid)
        log = open(tmp / "worker.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [sys.executable, "manage.py", "rqworker", "high"],  # the batch tasks' queue: the lines (low) stay queued
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base_kib = vm_hwm_kib(web_pid)
        for n in args.lines:
            row = run_size(httpx, base, token, tmp, tmp / "bench.sqlite3", n)
            row["web_peak_rss_mib"] = round(vm_hwm_kib(web_pid) / 1024, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"web process VmHWM before the first upload: {base_kib / 1024:.1f} MiB; cores: {os.cpu_count()}")
        if args.json:
            Path(args.json).write_text(json.dumps({"before_mib": round(base_kib / 1024, 1), "runs": rows}, indent=2))
        return 0
    except BenchError as exc:
        print(f"could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        stop_gunicorn(web)
        clean_up(conn, tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
