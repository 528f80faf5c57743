#!/usr/bin/env python3
"""1,000 streamed completions held open by the web tier at once: errors, memory per open stream, threads.

    .venv/bin/python bench/streams_1k.py [--streams 1000] [--workers 2] [--hold 10] [--redis-db 14]
                                         [--json out.json]

Set-up as bench/p1_submit.py (``server_env``: ``DEBUG=0``, a throw-away ``SECRET_KEY``, ``LOG_LEVEL=WARNING``,
SQLite in a temporary directory, Redis db ``--redis-db`` flushed before and after) and
``gunicorn -w 2 -k uvicorn_worker.UvicornWorker orchestrator_site.asgi:application``, production's stack.

1. Warm-up: 256 ``POST /jobs`` (64 at a time), so that Django's thread pools are full grown; then the RSS
   (``VmRSS``) and thread count of every gunicorn worker process.
2. A client process (asyncio, ``httpx.AsyncClient``) sends ``--streams`` ``POST /v1/chat/completions``
   with ``stream=true`` at once, pinned to the ``dev`` backend. No rqworker runs yet, so every job
   stays queued and every response stays open on its relay after its ``200`` and headers.
3. Once every stream has its headers, the same figures, ``--hold`` seconds later again.
4. An rqworker starts (``MAX_CONCURRENCY=64``, the dev backend at 0 ms); every stream must then end
   with its whole answer and ``data: [DONE]``.

Reports memory per open stream = (RSS with the streams open − RSS before) ÷ streams, summed over the
gunicorn workers, and their threads before and with the streams open. Exit status 0 when every stream
opened and ended whole, 1 otherwise, 2 when it could not run. ``RLIMIT_NOFILE`` is raised for the
server and the client (a stream is a socket at each end, and a Redis subscription is not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.openai_facade import start_worker, stop_worker  # noqa: E402
from bench.p1_submit import (  # noqa: E402  (the same set-up as P1)
    REDIS_DB,
    BenchError,
    _sigterm,
    clean_up,
    flush_bench_db,
    free_port,
    http,
    manage,
    redis_conn,
    server_env,
    start_gunicorn,
    stop_gunicorn,
    wait_ready,
    worker_pids,
)

PROMPT = "one two three four five"
DEV_SETUP = (
    "from routing.models import Backend\n"
    "Backend.objects.filter(name='dev').update(config={'latency_ms': 0, 'token_ms': 0}, max_concurrency=64)\n"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=1000, help="streams held open at once (default 1000)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn (uvicorn) workers (default 2)")
    p.add_argument("--hold", type=float, default=10.0, help="seconds to hold them open before the worker starts")
    p.add_argument("--open-timeout", type=float, default=180.0, help="seconds for every stream to open")
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--redis-db", type=int, default=REDIS_DB, help=f"flushed before and after (default {REDIS_DB})")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON to this path")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    p.add_argument("--client", nargs=3, metavar=("BASE", "TOKEN", "N"), help=argparse.SUPPRESS)
    return p.parse_args()


def raise_nofile(want: int = 8192) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the client (a process of its own) -------------------------------------------------------


async def client_main(base: str, token: str, n: int) -> None:
    """Open ``n`` streams; print {"opened": ...} once all have headers, {"ended": ...} once all ended."""
    import httpx

    limits = httpx.Limits(max_connections=n + 16, max_keepalive_connections=0)
    timeout = httpx.Timeout(600, connect=120, pool=120)
    opened = 0
    all_open = asyncio.Event()
    errors: list[str] = []
    whole = 0
    body = {"model": "dev", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    headers = {"Authorization": f"Token {token}"}

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal opened, whole
        try:
            async with client.stream("POST", base + "/v1/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                    return
                opened += 1
                if opened == n:
                    all_open.set()
                text, done = [], False
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        errors.append(f"error event: {event['error']}")
                        return
                    for choice in event.get("choices", ()):
                        text.append(choice.get("delta", {}).get("content") or "")
                if done and "".join(text).strip() == PROMPT:
                    whole += 1
                else:
                    errors.append(f"incomplete: done={done} text={''.join(text)!r}")
        except Exception as exc:  # any failure is a result here, not a crash
            errors.append(repr(exc))

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        started = time.monotonic()
        tasks = [asyncio.create_task(one(client)) for _ in range(n)]
        waiting = asyncio.ensure_future(all_open.wait())
        everything = asyncio.ensure_future(asyncio.gather(*tasks))
        await asyncio.wait({waiting, everything}, return_when=asyncio.FIRST_COMPLETED)
        print(json.dumps({"opened": opened, "open_s": time.monotonic() - started, "errors": errors[:20]}), flush=True)
        await everything
        waiting.cancel()
        print(json.dumps({"ended_whole": whole, "errors": len(errors), "first_errors": errors[:20]}), flush=True)


# --- the server's processes ------------------------------------------------------------------


def proc_figures(pids: list[int]) -> dict:
    """Summed VmRSS (KiB) and threads of ``pids``, and each one's."""
    per = {}
    for pid in pids:
        fields = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.strip()
        per[pid] = {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"])}
    return {
        "rss_kib": sum(p["rss_kib"] for p in per.values()),
        "threads": sum(p["threads"] for p in per.values()),
        "per_process": per,
    }


def open_fds(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def warm_up(base: str, token: str) -> None:
    headers = {"Authorization": f"Token {token}"}

    def submit(i: int) -> int:
        return http("POST", base + "/jobs", {"prompt": f"warm-up {i}"}, headers)[0]

    with ThreadPoolExecutor(64) as pool:  # more at once than both processes' thread pools hold
        codes = list(pool.map(submit, range(256)))
    if any(c != 202 for c in codes):
        raise BenchError(f"warm-up submissions answered {sorted(set(codes))}")


def main() -> int:
    args = parse_args()
    nofile = raise_nofile()
    if args.client:
        base, token, n = args.client
        asyncio.run(client_main(base, token, int(n)))
        return 0
    if nofile < args.streams * 2 + 256:
        print(f"RLIMIT_NOFILE is {nofile}: too few descriptors for {args.streams} streams", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="llmo-bench-streams-"))
    conn = server = worker = client = None
    try:
        conn = redis_conn(args)
        flush_bench_db(conn)
        env = server_env(args, tmp, PYTHONDONTWRITEBYTECODE="1")
        manage(env, "migrate", "--noinput", "-v", "0")
        token = json.loads(manage(env, "bootstrap_demo", "--json").strip().splitlines()[-1])["token"]
        manage(env, "shell", "-c", DEV_SETUP)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_gunicorn(args, env, port, tmp / "gunicorn.log", server="asgi")
        wait_ready(server, base, tmp / "gunicorn.log")
        web = worker_pids(server.pid)
        warm_up(base, token)
        time.sleep(1.0)
        before = proc_figures(web)
        fds_before = open_fds(web)
        print(f"gunicorn on {base}, workers {web}: {before['rss_kib']} KiB, {before['threads']} threads", flush=True)

        client = subprocess.Popen(
            [sys.executable, __file__, "--client", base, token, str(args.streams)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = client.stdout.readline()
        if not line:
            raise BenchError("the client died before reporting")
        opening = json.loads(line)
        print(f"opened {opening['opened']} of {args.streams} in {opening['open_s']:.1f}s", flush=True)
        with_streams = proc_figures(web)
        fds_with = open_fds(web)
        time.sleep(args.hold)
        held = proc_figures(web)
        print(f"with them open: {with_streams['rss_kib']} KiB, {with_streams['threads']} threads", flush=True)

        worker = start_worker(env, 64, tmp / "worker.log")
        ended_at = time.monotonic()
        line = client.stdout.readline()
        client.wait(timeout=60)
        if not line:
            raise BenchError("the client died before the streams ended")
        ending = json.loads(line)
        drain_s = time.monotonic() - ended_at
        if server.poll() is not None:
            raise BenchError("gunicorn died during the run")

        n = args.streams
        delta_kib = with_streams["rss_kib"] - before["rss_kib"]
        result = {
            "streams": n,
            "opened": opening["opened"],
            "open_s": opening["open_s"],
            "open_errors": opening["errors"],
            "ended_whole": ending["ended_whole"],
            "errors": ending["errors"],
            "first_errors": ending["first_errors"],
            "drain_s": drain_s,
            "before": before,
            "with_streams": with_streams,
            "after_hold": held,
            "kib_per_stream": delta_kib / n,
            "kib_per_stream_after_hold": (held["rss_kib"] - before["rss_kib"]) / n,
            "fds_before": fds_before,
            "fds_with_streams": fds_with,
        }
        ok = result["opened"] == n and result["ended_whole"] == n and result["errors"] == 0
        print()
        print(
            f"{n} streamed /v1 completions held open on gunicorn -w {args.workers} (uvicorn); "
            f"{os.cpu_count()} CPUs, load average before {load:.2f}"
        )
        print(f"opened: {result['opened']}/{n} in {result['open_s']:.1f}s; ended whole: {result['ended_whole']}/{n}")
        print(f"errors: {result['errors']}  {result['first_errors'][:3] if result['errors'] else ''}")
        print(
            f"gunicorn workers' RSS: {before['rss_kib'] / 1024:.1f} MiB before, {with_streams['rss_kib'] / 1024:.1f} "
            f"MiB with the streams open ({held['rss_kib'] / 1024:.1f} after {args.hold:g}s): "
            f"{result['kib_per_stream']:.1f} KiB per open stream ({result['kib_per_stream_after_hold']:.1f} after)"
        )
        print(
            f"threads in the gunicorn workers: {before['threads']} before, {with_streams['threads']} with the streams "
            f"open, {held['threads']} after {args.hold:g}s; open fds {fds_before} -> {fds_with}"
        )
        print(f"all streams ended {drain_s:.1f}s after the worker started")
        print(f"streams_1k: {'PASS' if ok else 'FAIL'}")
        if args.json_path:
            doc = {
                "benchmark": "1,000 streams held open",
                "config": {k: v for k, v in vars(args).items() if k not in ("json_path", "client")},
                "host": {"cpus": os.cpu_count(), "load_average_before": load, "python": platform.python_version()},
                **result,
            }
            Path(args.json_path).write_text(json.dumps(doc, indent=2) + "\n")
        return 0 if ok else 1
    except BenchError as exc:
        print(f"benchmark could not run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        stop_gunicorn(server)
        stop_worker(worker)
        clean_up(conn, tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
