#!/usr/bin/env python3
"""How soon a policy activated through the API governs routing in every gunicorn process.

    .venv/bin/python bench/hot_swap.py [--workers 4] [--rounds 5]

The design's goal: the next routing decision in every API process follows the new policy within one
second, with no restart. tests/test_routing_hot_swap.py asserts that it does (polled, no clock);
this measures how soon. Set-up as bench/p1_submit.py: SQLite in a temporary directory, Redis db 14
(flushed before and after), ``gunicorn -w N``. Each round activates the other of two policies
(``POST /policies/<id>/activate``), then sends bursts of 16 concurrent ``POST /jobs`` until every
process has loaded the new registry (each process records its reloads in ``llmo:routing:loaded``);
the lag is the last process's reload time minus the moment before the activation request. Every job
sent after the activation must already name the new policy: the report counts any that did not.
Exit status: 0 when every round's lag is under one second and no job used the old policy, 1 otherwise,
2 when it could not run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.p1_submit import (  # noqa: E402  (the same set-up as P1)
    BenchError,
    _sigterm,
    flush_bench_db,
    free_port,
    manage,
    redis_conn,
    server_env,
    start_gunicorn,
    stop_gunicorn,
    wait_ready,
)

GOAL_S = 1.0
LOADED_KEY = "llmo:routing:loaded"
VERSION_KEY = "llmo:routing:version"
SETUP = """
import json
from routing.models import Backend, BackendKind, RoutingPolicy
for name in ("alpha", "beta"):
    Backend.objects.get_or_create(name=name, defaults={"kind": BackendKind.DEV})
ids = [RoutingPolicy.objects.get_or_create(name=n, defaults={"strategy": "ordered", "params": {"order": o}})[0].pk
       for n, o in (("first", ["alpha", "beta"]), ("second", ["beta", "alpha"]))]
print(json.dumps(ids))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4, help="gunicorn sync workers (default 4)")
    p.add_argument("--rounds", type=int, default=5, help="activations measured (default 5)")
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=6379)
    return p.parse_args()


def loaded(conn, own: str) -> dict[str, tuple[str, float]]:
    out = {}
    for proc, value in conn.hgetall(LOADED_KEY).items():
        if proc.decode() == own:
            continue
        token, at = value.decode().split(" ", 1)
        out[proc.decode()] = (token, float(at))
    return out


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _sigterm)
    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="llmo-bench-hotswap-"))
    server = conn = None
    try:
        conn = redis_conn(args)
        flush_bench_db(conn)
        env = server_env(args, tmp)
        manage(env, "migrate", "--noinput", "-v", "0")
        token = json.loads(manage(env, "bootstrap_demo", "--json").strip().splitlines()[-1])["token"]
        policies = json.loads(manage(env, "shell", "-c", SETUP).strip().splitlines()[-1])
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log_path = tmp / "gunicorn.log"
        server = start_gunicorn(args, env, port, log_path)
        wait_ready(server, base, log_path)
        names = {policies[0]: "first", policies[1]: "second"}
        headers = {"Authorization": f"Token {token}"}
        lags, stale = [], 0
        with httpx.Client(base_url=base, headers=headers, timeout=30) as http, ThreadPoolExecutor(16) as pool:

            def burst() -> list[dict]:
                return list(pool.map(lambda i: http.post("/jobs", json={"prompt": f"job {i}"}).json(), range(16)))

            def until(done) -> list[dict]:
                deadline = time.monotonic() + 60
                jobs: list[dict] = []
                while not done():
                    if time.monotonic() > deadline:
                        raise BenchError(f"not every process reloaded within 60 s: {loaded(conn, '')}")
                    jobs += burst()
                return jobs

            until(lambda: len(loaded(conn, "")) >= args.workers)  # every process routed once
            for i in range(args.rounds + 1):  # round 0 is a warm-up
                policy = policies[(i + 1) % 2]
                activated_at = time.time()
                r = http.post(f"/policies/{policy}/activate")
                if r.status_code != 200:
                    raise BenchError(f"activation failed: {r.status_code} {r.text}")
                version = conn.get(VERSION_KEY).decode()
                after = until(lambda v=version: all(t == v for t, _ in loaded(conn, "").values()))
                lag = max(at for _, at in loaded(conn, "").values()) - activated_at
                stale += sum(1 for j in after if j.get("policy") != names[policy])
                if i:
                    lags.append(lag)
                    print(f"  round {i}: every process under {names[policy]!r} {lag * 1000:.0f} ms after activation")
        ok = max(lags) < GOAL_S and not stale
        median_ms = statistics.median(lags) * 1000
        print(
            f"\n{args.workers} processes, {args.rounds} activations: lag median {median_ms:.0f} ms,"
            f" max {max(lags) * 1000:.0f} ms (goal < {GOAL_S * 1000:.0f} ms); jobs routed under the old policy"
            f" after an activation: {stale}  ->  {'PASS' if ok else 'FAIL'}"
        )
        return 0 if ok else 1
    except BenchError as exc:
        print(f"hot_swap: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_gunicorn(server)
        if conn is not None:
            flush_bench_db(conn)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
