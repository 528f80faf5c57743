#!/usr/bin/env python3
"""Images in the job row vs out of it: the web worker's peak memory for one large image request,
and ``GET /jobs`` time over image jobs, for two checkouts of the code, alternately.

    git archive <commit-before> | tar -x -C /tmp/before
    .venv/bin/python bench/image_storage.py --before /tmp/before [--after .] [--rounds 3] [--redis-db 13]

Each round and checkout: a fresh SQLite database in a temporary directory (``migrate``,
``bootstrap_demo``, the ``dev`` backend made multimodal), ``gunicorn -w 1`` (one sync worker, so
its ``VmHWM`` is the request's peak), then

* one ``POST /jobs`` with ``--images`` distinct images of ``--image-mb`` MB each (as base64 JSON);
  reported: the worker's RSS before, its peak (``VmHWM``) after;
* ``--list-jobs`` more jobs with one such image each, then ``GET /jobs`` ``--list-reads`` times;
  reported: the median time.

Checkouts alternate within each round (before, after); the report gives medians and the
after/before ratios. Redis db ``--redis-db`` is flushed before and after (no other db is touched).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PNG_HEAD = b"\x89PNG\r\n\x1a\n"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="checkout of the code before the change")
    p.add_argument("--after", type=Path, default=ROOT, help="checkout after the change (default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=4, help="images in the large request (default 4)")
    p.add_argument("--image-mb", type=float, default=6.0, help="size of each image in MB (default 6)")
    p.add_argument("--list-jobs", type=int, default=6, help="image jobs in the list (default 6)")
    p.add_argument("--list-reads", type=int, default=7)
    p.add_argument("--redis-db", type=int, default=13)
    p.add_argument("--json", type=Path, help="write the figures here")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image(size: int) -> str:
    return base64.b64encode(PNG_HEAD + os.urandom(size - len(PNG_HEAD))).decode()


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def request(url: str, token: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    req.add_header("Authorization", f"Token {token}")
    req.add_header("Accept", "application/json")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=300) as resp:
        return resp.status, resp.read()


def measure(code: Path, args: argparse.Namespace) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="llmo-imgbench-"))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings",
        "DATABASE_URL": f"sqlite:///{tmp}/db.sqlite3",
        "REDIS_URL": f"redis://127.0.0.1:6379/{args.redis_db}",
        "VAR_DIR": str(tmp),
        "DEBUG": "0",
        "SECRET_KEY": "image-bench-secret-key-not-for-production-0123456789",
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "JOB_RETENTION_DAYS": "0",
    }
    py = sys.executable
    proc = None
    try:
        subprocess.run([py, "manage.py", "migrate", "-v0"], cwd=code, env=env, check=True)
        boot = subprocess.run(
            [py, "manage.py", "bootstrap_demo", "--json"], cwd=code, env=env, check=True, capture_output=True, text=True
        )
        token = json.loads(boot.stdout.strip().splitlines()[-1])["token"]
        subprocess.run(
            [py, "manage.py", "shell", "-c", "from routing.models import Backend;"
             "Backend.objects.filter(name='dev').update(supports_multimodal=True)"],
            cwd=code, env=env, check=True, capture_output=True,
        )  # fmt: skip
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(tmp / "gunicorn.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [py, "-m", "gunicorn", "orchestrator_site.wsgi", "-w", "1", "-b", f"127.0.0.1:{port}", "--timeout", "300"],
            cwd=code,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                request(f"{base}/jobs", token)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError((tmp / "gunicorn.log").read_text()) from None
                time.sleep(0.2)
        worker = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        size = int(args.image_mb * 1024 * 1024)
        body = json.dumps({"prompt": "describe", "images": [image(size) for _ in range(args.images)]}).encode()
        rss_before = status_kb(worker, "VmRSS")
        started = time.perf_counter()
        code_, _ = request(f"{base}/jobs", token, body)
        post_s = time.perf_counter() - started
        assert code_ == 202, code_
        peak = status_kb(worker, "VmHWM")
        del body
        for _ in range(args.list_jobs - 1):
            request(f"{base}/jobs", token, json.dumps({"prompt": "describe", "images": [image(size)]}).encode())
        reads = []
        for _ in range(args.list_reads):
            started = time.perf_counter()
            code_, raw = request(f"{base}/jobs", token)
            reads.append(time.perf_counter() - started)
            assert code_ == 200 and len(json.loads(raw)["results"]) == args.list_jobs
        return {
            "body_mb": round(args.images * size * 4 / 3 / 1e6, 1),
            "rss_before_mb": rss_before / 1024,
            "peak_mb": peak / 1024,
            "post_s": post_s,
            "list_s": statistics.median(reads),
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        subprocess.run(["redis-cli", "-n", str(args.redis_db), "flushdb"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    args = parse_args()
    subprocess.run(["redis-cli", "-n", str(args.redis_db), "flushdb"], capture_output=True)
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for n in range(args.rounds):
        for name, code in (("before", args.before), ("after", args.after)):
            result = measure(code.resolve(), args)
            runs[name].append(result)
            print(f"round {n + 1} {name:6}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"\nmedians over {args.rounds} rounds (one sync gunicorn worker, SQLite):")
    for k in med["before"]:
        b, a = med["before"][k], med["after"][k]
        print(f"  {k:14} before {b:9.3f}  after {a:9.3f}  after/before {a / b if b else float('nan'):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": med}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
