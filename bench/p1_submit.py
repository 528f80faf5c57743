#!/usr/bin/env python3
"""P1: ``POST /jobs`` throughput and latency against a bare Django view, in one run.

    .venv/bin/python bench/p1_submit.py [--duration 10] [--connections 8] [--workers 2] [--tenant-limits]
                                          [--server asgi|sync|both] [--redis-db 14] [--json out.json]

What it does, all in a temporary directory that is removed at the end:

* settings are production-like (``DEBUG=0``, ``SECRET_KEY``, ``ALLOWED_HOSTS``), SQLite at
  ``<tmp>/bench.sqlite3``, Redis db 14 or ``--redis-db`` (flushed before and after; no other db is touched),
  ``ROOT_URLCONF=bench.urls`` (the real site plus ``/bench/bare-submit``);
* ``migrate`` + ``bootstrap_demo --json`` give the ``dev`` backend, an active policy and an API token;
* ``gunicorn -w N`` serves on a free local port: ``--server asgi`` (the default) as production runs it,
  uvicorn workers and ``orchestrator_site.asgi``; ``--server sync`` the way it ran before the web tier
  went ASGI, sync workers and ``orchestrator_site.wsgi``; ``--server both`` starts one of each and
  alternates them round by round, so the two stacks are compared under the same load on the machine;
* ``wrk --latency`` with ``bench/p1_post.lua`` loads each endpoint: a short warm-up each, then
  baseline and API alternately (``--rounds`` times each); the report uses the medians.

Goal (P1): API throughput >= 0.7x the baseline's and API p99 <= 3x the baseline's, each server's API
against the baseline served by the same server. With ``--server both`` the exit status is the ASGI
stack's (the one production runs).

``--tenant-limits`` adds a third endpoint run in every round: ``POST /jobs`` by a user of a tenant
with every counted limit set (``rpm_limit``, ``tokens_per_day``, ``budget_usd``, ``max_queued``; far
above what the run reaches, so every request is admitted): admission's script runs on each request.
It must meet the same goals, and the report gives its throughput against the API without limits.
Nothing drains the RQ queue during the run; db 14 is flushed at the end.
Exit status: 0 PASS, 1 FAIL, 2 could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "bench" / "p1_post.lua"
REDIS_DB = 14  # unless --redis-db: the only Redis database this script ever writes to or flushes
SERVERS = ("asgi", "sync")
API_PATH = "/jobs"
BARE_PATH = "/bench/bare-submit"
GOAL_THROUGHPUT_RATIO = 0.7
GOAL_P99_RATIO = 3.0


LIMITED = "api-limits"  # POST /jobs by a tenant with every admission limit set (--tenant-limits)
MODES = ("bare", "api", LIMITED)
# The tenant of --tenant-limits: every counted limit set, far above what a run reaches.
LIMITED_TENANT = (
    "from decimal import Decimal\n"
    "from django.contrib.auth import get_user_model\n"
    "from rest_framework.authtoken.models import Token\n"
    "from tenants.models import Membership, Tenant\n"
    "t = Tenant.objects.create(name='bench-limited', rpm_limit=10**9, tokens_per_day=10**15,\n"
    "    budget_usd=Decimal(10**9), budget_period='month', max_queued=10**9)\n"
    "u = get_user_model().objects.create_user('bench-limited', password=None)\n"
    "Membership.objects.create(user=u, tenant=t)\n"
    "print(Token.objects.create(user=u).key)\n"
)


class BenchError(Exception):
    """The benchmark could not run (not a performance failure)."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    p.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    p.add_argument("--threads", type=int, default=0, help="wrk threads (default min(2, connections))")
    p.add_argument("--workers", type=int, default=2, help="gunicorn sync workers (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="measured runs per endpoint, alternating (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds per endpoint (default 2)")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON to this path")
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--redis-db", type=int, default=REDIS_DB, help=f"flushed before and after (default {REDIS_DB})")
    p.add_argument(
        "--server",
        choices=(*SERVERS, "both"),
        default="asgi",
        help="asgi: uvicorn workers (production); sync: sync workers and WSGI (before); both: alternate",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    p.add_argument(
        "--tenant-limits",
        action="store_true",
        help="also measure POST /jobs by a tenant with every admission limit set (admitted, but counted)",
    )
    args = p.parse_args()
    if args.duration < 1 or args.connections < 1 or args.workers < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--duration, --connections, --workers and --rounds must be >= 1, --warmup >= 0")
    args.threads = args.threads or min(2, args.connections)
    if args.threads > args.connections:
        p.error("--threads must not exceed --connections")
    return args


# --- Redis (db 14 only) ----------------------------------------------------------------------


def redis_url(args: argparse.Namespace) -> str:
    return f"redis://{args.redis_host}:{args.redis_port}/{db_of(args)}"


def db_of(args: argparse.Namespace) -> int:
    return getattr(args, "redis_db", REDIS_DB)  # other benches reuse these helpers without the option


def redis_conn(args: argparse.Namespace):
    try:
        import redis
    except ImportError:
        raise BenchError(
            f"the redis package is not importable by {sys.executable}; run with the project venv "
            "(.venv/bin/python bench/p1_submit.py, or `make bench-p1`)"
        ) from None
    conn = redis.Redis(host=args.redis_host, port=args.redis_port, db=db_of(args), socket_connect_timeout=2)
    try:
        conn.ping()
    except redis.RedisError as exc:
        raise BenchError(f"Redis is not reachable at {args.redis_host}:{args.redis_port}: {exc}") from None
    return conn


def flush_bench_db(conn) -> None:
    assert conn.connection_pool.connection_kwargs["db"] != 0  # never the default db
    conn.flushdb()


def clean_up(conn, tmp: Path, keep: bool) -> None:
    """A bench's last step: its Redis db flushed (best effort, saying what was left) and its directory
    removed unless ``keep``."""
    if conn is not None:
        try:
            flush_bench_db(conn)
        except Exception as exc:  # cleanup is best effort; say what was left behind
            db = conn.connection_pool.connection_kwargs.get("db")
            print(f"could not flush Redis db {db}: {exc}", file=sys.stderr)
    if keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


# --- wrk -------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparseable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> dict:
    """Requests/s, p50/p90/p99 (ms), request and error counts from ``wrk --latency`` output."""
    result: dict = {}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if not m:
        raise BenchError(f"could not parse wrk output:\n{output}")
    result["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", output, re.M)
        result[f"p{pct}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"^\s+(\d+) requests in ([\d.]+)(\w+)", output, re.M)
    result["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    result["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    return result


def run_wrk(
    args: argparse.Namespace,
    base: str,
    mode: str,
    token: str,
    seconds: int,
    nonce: str,
    workers: list[int] | None = None,
    label: str | None = None,
) -> dict:
    path = API_PATH if mode == "api" else BARE_PATH
    cmd = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA),
        base + path,
        "--",
        mode,
        token,
        nonce,
    ]
    cpu_before = cpu_seconds(workers or [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {seconds + 30}s") from None
    finally:
        if proc.poll() is None:  # interrupted or timed out: leave no wrk behind
            proc.kill()
            proc.wait()
    cpu_after = cpu_seconds(workers or [])
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{out}\n{err}")
    result = parse_wrk(out)
    result["mode"] = label or mode
    result["seconds"] = seconds
    # Server CPU per request: what the application costs, much less sensitive to a noisy
    # machine than req/s (which also pays for wrk, Redis and the kernel on the same CPUs).
    ok = cpu_before is not None and cpu_after is not None and result["requests"]
    result["server_cpu_ms_per_req"] = (cpu_after - cpu_before) * 1e3 / result["requests"] if ok else None
    return result


# --- the server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(args: argparse.Namespace, tmp: Path, **extra: str) -> dict:
    """The environment of a production-like site in ``tmp``: SQLite there, the bench's Redis db, DEBUG off
    with a throw-away key, static files collected into ``tmp/static`` (made here)."""
    (tmp / "static").mkdir(exist_ok=True)
    inherited = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY_FILE", "DATABASE_URL")}
    return {
        **inherited,
        "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings",
        "VAR_DIR": str(tmp),
        "DATABASE_URL": f"sqlite:///{tmp / 'bench.sqlite3'}",
        "REDIS_URL": redis_url(args),
        "DEBUG": "0",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "LOG_LEVEL": "WARNING",
        "STATIC_ROOT": str(tmp / "static"),
        **extra,
    }


def manage(env: dict, *argv: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"manage.py {' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def limited_user(env: dict) -> str:
    """A user of a tenant with every admission limit set; its API token."""
    return manage(env, "shell", "-c", LIMITED_TENANT).strip().splitlines()[-1]


def start_gunicorn(
    args: argparse.Namespace, env: dict, port: int, log_path: Path, server: str = "asgi"
) -> subprocess.Popen:
    """``gunicorn -w args.workers``: ``server`` "sync" (sync workers, WSGI) or "asgi" (uvicorn workers, ASGI)."""
    worker_class, app = {
        "sync": ("sync", "orchestrator_site.wsgi:application"),
        "asgi": ("uvicorn_worker.UvicornWorker", "orchestrator_site.asgi:application"),
    }[server]
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        str(args.workers),
        "-k",
        worker_class,
        "-b",
        f"127.0.0.1:{port}",
        "--chdir",
        str(ROOT),
        "--log-level",
        "warning",
        app,
    ]
    log = open(log_path, "wb")  # noqa: SIM115 (closed by the caller via proc.bench_log)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.bench_log = log  # type: ignore[attr-defined]
    return proc


def stop_gunicorn(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the master stops its workers
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only gunicorn and its workers
            proc.wait(timeout=5)
    proc.bench_log.close()  # type: ignore[attr-defined]


def worker_pids(master: int) -> list[int]:
    """The gunicorn workers: processes whose parent is the master (Linux /proc; [] elsewhere)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == master:
            pids.append(int(entry.name))
    return sorted(pids)


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU time of ``pids``; None when any of them is gone or /proc is missing."""
    if not pids:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")[:2000]}


def wait_ready(proc: subprocess.Popen, base: str, log_path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"gunicorn exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            status, _ = http("GET", base + "/readyz")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise BenchError(f"gunicorn did not become ready in {timeout:.0f}s:\n{log_path.read_text()[-4000:]}")


def smoke(base: str, token: str, nonce: str) -> None:
    """One request each, so the load test measures the success path of both endpoints."""
    body = {"prompt": "Say hello in one short sentence.", "priority": "normal"}
    status, doc = http("POST", base + BARE_PATH, body)
    if status != 202 or doc.get("state") != "queued":
        raise BenchError(f"baseline smoke request answered {status}: {doc}")
    headers = {"Authorization": f"Token {token}", "Idempotency-Key": f"{nonce}-smoke"}
    status, doc = http("POST", base + API_PATH, body, headers)
    if status != 202 or doc.get("state") != "queued" or doc.get("backend") != "dev":
        raise BenchError(f"API smoke request answered {status}: {doc}")


# --- report ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
    by = {mode: [r for r in runs if r["mode"] == mode] for mode in modes}
    keys = ("rps", "p50_ms", "p90_ms", "p99_ms", "server_cpu_ms_per_req")
    med = {mode: {k: median_of(rs, k) for k in keys} for mode, rs in by.items()}
    throughput_ratio = med["api"]["rps"] / med["bare"]["rps"]
    p99_ratio = med["api"]["p99_ms"] / med["bare"]["p99_ms"]
    cpu = med["api"]["server_cpu_ms_per_req"], med["bare"]["server_cpu_ms_per_req"]
    # Each API run against the baseline run just before it: a slow spell on a shared
    # machine hits both of a pair, so the spread of these shows how noisy the run was.
    pair_ratios = [a["rps"] / b["rps"] for b, a in zip(by["bare"], by["api"], strict=True)]
    spread = {mode: max(r["rps"] for r in rs) / min(r["rps"] for r in rs) for mode, rs in by.items()}
    errors = sum(r["non_2xx"] + r["socket_errors"] for r in runs)
    ok_t = throughput_ratio >= GOAL_THROUGHPUT_RATIO
    ok_p = p99_ratio <= GOAL_P99_RATIO
    limits: dict = {}
    if LIMITED in med:
        lim = med[LIMITED]
        limits = {
            "limits_throughput_ratio": lim["rps"] / med["bare"]["rps"],
            "limits_p99_ratio": lim["p99_ms"] / med["bare"]["p99_ms"],
            "limits_vs_no_limits_throughput": lim["rps"] / med["api"]["rps"],
            "limits_pair_vs_no_limits": [b["rps"] / a["rps"] for a, b in zip(by["api"], by[LIMITED], strict=True)],
        }
        ok_t = ok_t and limits["limits_throughput_ratio"] >= GOAL_THROUGHPUT_RATIO
        ok_p = ok_p and limits["limits_p99_ratio"] <= GOAL_P99_RATIO
    return {
        **limits,
        "median": med,
        "throughput_ratio": throughput_ratio,
        "p99_ratio": p99_ratio,
        "pair_throughput_ratios": pair_ratios,
        "server_cpu_ratio": cpu[0] / cpu[1] if None not in cpu else None,
        "rps_spread": spread,
        "noisy": any(v > 1.25 for v in spread.values()),
        "errors": errors,
        "pass_throughput": ok_t,
        "pass_p99": ok_p,
        "pass": ok_t and ok_p and errors == 0,
    }


def print_report(
    args: argparse.Namespace, runs: list[dict], summary: dict, db_counts: dict, load: float, server: str = "sync"
) -> None:
    label = {"bare": "baseline", "api": "POST /jobs", LIMITED: "  with limits"}
    print()
    kind = "uvicorn workers, ASGI" if server == "asgi" else "sync workers, WSGI"
    print(
        f"P1: gunicorn -w {args.workers} ({kind}), wrk -t{args.threads} -c{args.connections} "
        f"-d{args.duration}s, {args.rounds} rounds each, alternating; {os.cpu_count()} CPUs "
        f"(load average before start {load:.2f})"
    )
    head = (
        f"{'run':<18}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'cpu ms/req':>12}{'requests':>10}{'errors':>8}"
    )
    print(head)
    print("-" * len(head))
    counts: dict[str, int] = {}
    for r in runs:
        counts[r["mode"]] = counts.get(r["mode"], 0) + 1
        name = f"{label[r['mode']]} #{counts[r['mode']]}"
        print(
            f"{name:<18}{r['rps']:>9.1f}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}"
            f"{_fmt(r['server_cpu_ms_per_req']):>12}{r['requests']:>10}{r['non_2xx'] + r['socket_errors']:>8}"
        )
    print("-" * len(head))
    for mode in summary["median"]:
        m = summary["median"][mode]
        name = f"{label[mode]} median"
        print(
            f"{name:<18}{m['rps']:>9.1f}{m['p50_ms']:>9.2f}{m['p90_ms']:>9.2f}{m['p99_ms']:>9.2f}"
            f"{_fmt(m['server_cpu_ms_per_req']):>12}"
        )
    print()
    t, p = summary["throughput_ratio"], summary["p99_ratio"]
    print(
        f"throughput ratio api/baseline: {t:.2f}  (goal >= {GOAL_THROUGHPUT_RATIO})  "
        f"{'PASS' if summary['pass_throughput'] else 'FAIL'}"
    )
    print(
        f"p99 ratio api/baseline:        {p:.2f}  (goal <= {GOAL_P99_RATIO})  "
        f"{'PASS' if summary['pass_p99'] else 'FAIL'}"
    )
    pairs = ", ".join(f"{x:.2f}" for x in summary["pair_throughput_ratios"])
    print(f"per-round throughput ratios:   {pairs}")
    if "limits_throughput_ratio" in summary:
        print(
            f"with tenant limits/baseline:   {summary['limits_throughput_ratio']:.2f} throughput, "
            f"{summary['limits_p99_ratio']:.2f} p99 (same goals)"
        )
        pairs = ", ".join(f"{x:.2f}" for x in summary["limits_pair_vs_no_limits"])
        print(
            f"with limits/without limits:    {summary['limits_vs_no_limits_throughput']:.2f} throughput "
            f"(per round: {pairs})"
        )
    if summary["server_cpu_ratio"] is not None:
        print(
            f"server CPU per request:        api {summary['median']['api']['server_cpu_ms_per_req']:.2f} ms, "
            f"baseline {summary['median']['bare']['server_cpu_ms_per_req']:.2f} ms "
            f"(x{summary['server_cpu_ratio']:.2f}; gunicorn workers only)"
        )
    if summary["noisy"]:
        spread = ", ".join(f"{label[k]} x{v:.2f}" for k, v in summary["rps_spread"].items())
        print(
            f"WARNING: the machine looks busy (req/s max/min across rounds: {spread}); wrk, gunicorn "
            "and Redis share these CPUs, so rerun on a quiet machine before trusting the ratio"
        )
    if summary["errors"]:
        print(f"errors (non-2xx or socket): {summary['errors']}  -> FAIL (results do not measure the success path)")
    print_rows(db_counts)
    print(f"P1 ({server}): {'PASS' if summary['pass'] else 'FAIL'}")


def print_rows(db_counts: dict) -> None:
    if db_counts:
        print(
            f"rows inserted: api {db_counts.get('api_rows')}, baseline {db_counts.get('bare_rows')}; "
            f"queue 'normal' holds {db_counts.get('rq_normal')} jobs"
        )


def print_comparison(by_server: dict[str, dict]) -> None:
    """ASGI against sync, endpoint by endpoint (medians of each server's rounds)."""
    a, s = by_server["asgi"]["median"], by_server["sync"]["median"]
    print("\nASGI vs sync (medians):")
    for mode in a:
        cpu = (a[mode]["server_cpu_ms_per_req"], s[mode]["server_cpu_ms_per_req"])
        cpu_text = f", server CPU {cpu[0]:.2f} vs {cpu[1]:.2f} ms/req" if None not in cpu else ""
        print(
            f"  {mode:<10} {a[mode]['rps']:.1f} vs {s[mode]['rps']:.1f} req/s "
            f"(x{a[mode]['rps'] / s[mode]['rps']:.2f}), "
            f"p99 {a[mode]['p99_ms']:.2f} vs {s[mode]['p99_ms']:.2f} ms{cpu_text}"
        )
    print(
        f"  P1 ratio   asgi {by_server['asgi']['throughput_ratio']:.2f}, "
        f"sync {by_server['sync']['throughput_ratio']:.2f}"
    )


def count_rows(db_path: Path, conn) -> dict:
    out: dict = {}
    try:
        db = sqlite3.connect(db_path)
        try:
            api, bare = db.execute(
                "SELECT SUM(created_by_id IS NOT NULL), SUM(created_by_id IS NULL) FROM jobs_job"
            ).fetchone()
        finally:
            db.close()
        out["api_rows"], out["bare_rows"] = api or 0, bare or 0
    except sqlite3.Error as exc:
        out["error"] = str(exc)
    sys.path.insert(0, str(ROOT))  # run as a script: the project is not on the path
    from jobs.fair_queue import depths  # the fair queue holds the jobs; RQ's own list stays empty

    out["rq_normal"] = depths(["normal"], client=conn)["normal"]
    return out


# --- main ------------------------------------------------------------------------------------


def _sigterm(signum, frame):  # pragma: no cover - signal path
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    if shutil.which("wrk") is None:
        print(
            "wrk is not installed. Install it with `apt-get install -y wrk` (Debian/Ubuntu) or "
            "`brew install wrk` (macOS), then run this again.",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    tmp = Path(tempfile.mkdtemp(prefix="llmo-bench-p1-"))
    conn = None
    servers: dict[str, dict] = {}  # name -> proc, base, log, workers
    try:
        conn = redis_conn(args)
        flush_bench_db(conn)
        env = server_env(args, tmp, ROOT_URLCONF="bench.urls", PYTHONDONTWRITEBYTECODE="1")
        t0 = time.monotonic()
        manage(env, "migrate", "--noinput", "-v", "0")
        creds = json.loads(manage(env, "bootstrap_demo", "--json").strip().splitlines()[-1])
        token = creds["token"]
        limited_token = limited_user(env) if args.tenant_limits else ""
        modes = [("bare", "bare", token), ("api", "api", token)]
        if limited_token:
            modes.append((LIMITED, "api", limited_token))

        nonce = secrets.token_hex(4)
        for name in SERVERS if args.server == "both" else (args.server,):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            log_path = tmp / f"gunicorn-{name}.log"
            proc = start_gunicorn(args, env, port, log_path, server=name)
            servers[name] = {"proc": proc, "base": base, "log": log_path}
            wait_ready(proc, base, log_path)
            smoke(base, token, f"{nonce}{name}")
            servers[name]["workers"] = worker_pids(proc.pid)
            print(f"gunicorn ({name}) on {base}", flush=True)
        print(f"setup {time.monotonic() - t0:.1f}s; warming up...", flush=True)

        if args.warmup:
            for name, srv in servers.items():
                for label, mode, tok in modes:
                    run_wrk(args, srv["base"], mode, tok, args.warmup, f"{nonce}w{name}{label}")
        runs = []
        for i in range(args.rounds):
            # Both servers in every round, their order swapped each round: a slow spell hits both.
            for name in list(servers)[:: 1 if i % 2 == 0 else -1]:
                srv = servers[name]
                for label, mode, tok in modes:
                    r = run_wrk(
                        args, srv["base"], mode, tok, args.duration, f"{nonce}r{i}{name}{label}", srv["workers"], label
                    )
                    r["server"] = name
                    runs.append(r)
                    print(
                        f"  {name:<5}{label:<10} round {i + 1}: {r['rps']:.1f} req/s, p50 {r['p50_ms']:.2f} ms, "
                        f"p99 {r['p99_ms']:.2f} ms, server CPU {_fmt(r['server_cpu_ms_per_req'])} ms/req",
                        flush=True,
                    )
        for name, srv in servers.items():
            if srv["proc"].poll() is not None:
                raise BenchError(f"gunicorn ({name}) died during the run:\n{srv['log'].read_text()[-4000:]}")

        by_server = {name: summarize([r for r in runs if r["server"] == name]) for name in servers}
        primary = "asgi" if "asgi" in servers else "sync"
        summary = by_server[primary]
        db_counts = count_rows(tmp / "bench.sqlite3", conn)
        for name in servers:
            print_report(args, [r for r in runs if r["server"] == name], by_server[name], {}, load, server=name)
        if len(servers) > 1:
            print_comparison(by_server)
        print_rows(db_counts)
        for name, srv in servers.items():
            server_log = srv["log"].read_text().strip()
            if server_log:
                print(f"\ngunicorn ({name}) log (last lines):\n{server_log[-2000:]}")
        if args.json_path:
            doc = {
                "benchmark": "P1 POST /jobs vs bare Django view",
                "config": {
                    "duration_s": args.duration,
                    "connections": args.connections,
                    "threads": args.threads,
                    "workers": args.workers,
                    "rounds": args.rounds,
                    "warmup_s": args.warmup,
                    "tenant_limits": args.tenant_limits,
                    "servers": list(servers),
                },
                "host": {
                    "cpus": os.cpu_count(),
                    "load_average_before": load,
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "goals": {"throughput_ratio_min": GOAL_THROUGHPUT_RATIO, "p99_ratio_max": GOAL_P99_RATIO},
                "runs": runs,
                "rows": db_counts,
                "by_server": by_server,
                **summary,
            }
            Path(args.json_path).write_text(json.dumps(doc, indent=2) + "\n")
            print(f"results written to {args.json_path}")
        return 0 if summary["pass"] else 1
    except BenchError as exc:
        print(f"benchmark could not run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for srv in servers.values():
            stop_gunicorn(srv["proc"])
        clean_up(conn, tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
