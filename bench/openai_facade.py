#!/usr/bin/env python3
"""What the OpenAI-compatible façade adds: the same completions sent to a fake OpenAI server directly
and through our ``/v1/chat/completions``, with OpenAI's own SDK, at 16 concurrent clients.

    .venv/bin/python bench/openai_facade.py [--requests 400] [--concurrency 16] [--rounds 3]
                                            [--max-concurrency 32] [--redis-db 14] [--json out.json]

Set-up as bench/p1_submit.py (``server_env``: ``DEBUG=0``, a throw-away ``SECRET_KEY``,
``LOG_LEVEL=WARNING``, SQLite in a temporary directory, Redis db ``--redis-db`` flushed before and
after), plus:

* the fake (``tests.fakes.openai_server.OpenAIFake``, answering at once) in a process of its own, so
  that neither the client's nor anyone else's GIL delays its answers;
* a ``Backend`` of kind ``openai`` named ``fake`` pointing at it (``max_concurrency`` 64);
* ``gunicorn -w 2 -k uvicorn_worker.UvicornWorker orchestrator_site.asgi:application`` (production's
  stack) and one ``manage.py rqworker high normal low`` with ``MAX_CONCURRENCY=--max-concurrency``.

The client (``openai.AsyncOpenAI``, one per target, ``max_retries=0``) keeps ``--concurrency``
requests in flight; each completion is ``model="fake"`` (the backend's name: pinned, no routing
choice), a short user message, answered with the same words. Per round, alternating which goes
first: ``--requests`` plain completions direct, then through the façade; then as many streamed ones,
timing the first chunk with content (time to first token). The report gives p50/p99 of each, the
façade minus direct (goals: p50 ≤ 10 ms, p99 ≤ 50 ms added; streamed, first token p50 ≤ 10 ms added),
and, for the façade's jobs, where the time went from the job rows' timestamps: submit to
``started_at`` (queue, dequeue, claim), ``started_at`` to ``finished_at`` (the backend call and
its outcome), and ``finished_at`` to the client's answer (commit, status mirror, pub/sub, relay).

Exit status: 0 when every goal is met, 1 otherwise, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.p1_submit import (  # noqa: E402  (the same set-up as P1)
    REDIS_DB,
    BenchError,
    _sigterm,
    clean_up,
    cpu_seconds,
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

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "fake"
PROMPT = "Say hello in one short sentence please"
GOALS_MS = {"added_p50": 10.0, "added_p99": 50.0, "added_ttft_p50": 10.0}

# The fake in its own process: prints its base URL, serves until its stdin closes.
FAKE_MAIN = (
    "import sys\n"
    f"sys.path.insert(0, {str(ROOT)!r})\n"
    "from tests.fakes import _Server\n"
    "from tests.fakes.openai_server import OpenAIFake\n"
    "_Server.request_queue_size = 1024  # socketserver listens with a backlog of 5: 16 clients connecting overflow it\n"
    "fake = OpenAIFake().start()\n"
    "print(fake.base_url, flush=True)\n"
    "sys.stdin.read()\n"
    "fake.stop()\n"
)
BACKEND_SETUP = (
    "from routing.models import Backend, BackendKind\n"
    f"Backend.objects.create(name={BACKEND!r}, kind=BackendKind.OPENAI, base_url={{url!r}}, model='gpt-test',\n"
    "    max_concurrency=64, timeout_s=30)\n"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=400, help="completions per target, kind and round (default 400)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the targets alternating (default 3)")
    p.add_argument("--warmup", type=int, default=64, help="unmeasured requests per target first (default 64)")
    p.add_argument("--workers", type=int, default=2, help="gunicorn (uvicorn) workers (default 2)")
    p.add_argument("--max-concurrency", type=int, default=32, help="the rqworker's MAX_CONCURRENCY (default 32)")
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--redis-db", type=int, default=REDIS_DB, help=f"flushed before and after (default {REDIS_DB})")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON to this path")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, database)")
    args = p.parse_args()
    if min(args.requests, args.concurrency, args.rounds, args.workers, args.max_concurrency) < 1:
        p.error("--requests, --concurrency, --rounds, --workers and --max-concurrency must be >= 1")
    return args


# --- processes -------------------------------------------------------------------------------


def start_fake() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_MAIN],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # a client closing a kept-alive connection prints a traceback there
        text=True,
    )
    line = proc.stdout.readline().strip()
    if not line.startswith("http"):
        proc.kill()
        raise BenchError(f"the fake OpenAI server did not start: {line!r}")
    return proc, line


def stop_fake(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.stdin.close()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_worker(env: dict, max_concurrency: int, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "manage.py"), "rqworker", "high", "normal", "low"]
    log = open(log_path, "wb")  # noqa: SIM115 (closed with the process in stop_worker)
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env, "MAX_CONCURRENCY": str(max_concurrency)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.bench_log = log  # type: ignore[attr-defined]
    return proc


def stop_worker(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    proc.bench_log.close()  # type: ignore[attr-defined]


# --- the client ------------------------------------------------------------------------------


async def _one(client, model: str, stream: bool) -> dict:
    """One completion: its latency (and first-token time when streamed), the job id when there is one."""
    messages = [{"role": "user", "content": PROMPT}]
    t0 = time.perf_counter()
    wall0 = time.time()
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=messages)
        answer = raw.parse()
        took = time.perf_counter() - t0
        text = answer.choices[0].message.content
        return {
            "ms": took * 1e3,
            "job": raw.headers.get("x-job-id"),
            "start": wall0,
            "end": wall0 + took,
            "wrong": None if text == PROMPT else text,
        }
    first = None
    text = []
    raw = await client.chat.completions.with_raw_response.create(model=model, messages=messages, stream=True)
    async for chunk in raw.parse():
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content:
            if first is None:
                first = time.perf_counter() - t0
            text.append(content)
    took = time.perf_counter() - t0
    whole = "".join(text).strip()
    return {
        "ms": took * 1e3,
        "ttft_ms": (first if first is not None else took) * 1e3,
        "job": raw.headers.get("x-job-id"),
        "start": wall0,
        "wrong": None if whole == PROMPT else whole,
    }


async def load(target: tuple[str, str, str], n: int, concurrency: int, stream: bool) -> list[dict]:
    """``n`` completions, ``concurrency`` at a time, through one ``AsyncOpenAI`` client; ``target`` is
    (base URL, API key, model)."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    base_url, api_key, model = target
    async with openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=30,
        http_client=httpx.AsyncClient(limits=limits, timeout=30),
    ) as client:
        todo = iter(range(n))
        results: list[dict] = []

        async def lane() -> None:
            for _ in todo:
                results.append(await _one(client, model, stream))

        await asyncio.gather(*(lane() for _ in range(concurrency)))
    return results


def cpu_now(procs: dict[str, list[int] | None]) -> dict[str, float | None]:
    """CPU seconds so far of each group of processes (None: this process)."""
    return {name: time.process_time() if pids is None else cpu_seconds(pids) for name, pids in procs.items()}


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


# --- where the façade's time went -----------------------------------------------------------


def phases(db_path: Path, results: list[dict]) -> dict:
    """Per façade job (non-streamed): submit → started, started → finished, finished → client's answer (ms)."""
    ids = {r["job"].replace("-", ""): r for r in results if r.get("job")}
    if not ids:
        return {}
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute("SELECT id, created_at, started_at, finished_at FROM jobs_job").fetchall()
    finally:
        db.close()
    out: dict[str, list[float]] = {"created": [], "queued": [], "ran": [], "answered": []}
    for job_id, created, started, finished in rows:
        r = ids.get(str(job_id).replace("-", ""))
        if r is None or "end" not in r:
            continue
        c, s, f = _parse(created), _parse(started), _parse(finished)
        if None in (c, s, f):
            continue
        out["created"].append((c - r["start"]) * 1e3)
        out["queued"].append((s - c) * 1e3)
        out["ran"].append((f - s) * 1e3)
        out["answered"].append((r["end"] - f) * 1e3)
    return {k: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for k, v in out.items() if v}


def _parse(text: str | None) -> float | None:
    if not text:
        return None
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:  # Django stores UTC in SQLite without an offset
        from datetime import UTC

        value = value.replace(tzinfo=UTC)
    return value.timestamp()


# --- main ------------------------------------------------------------------------------------


def summarize(samples: dict[tuple[str, str], list[dict]]) -> dict:
    out: dict = {}
    for (kind, target), rs in samples.items():
        ms = [r["ms"] for r in rs]
        row = {"n": len(rs), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "wrong": sum(bool(r["wrong"]) for r in rs)}
        if kind == "stream":
            ttft = [r["ttft_ms"] for r in rs]
            row.update(ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99))
        out.setdefault(kind, {})[target] = row
    plain, streamed = out["plain"], out["stream"]
    out["added"] = {
        "p50_ms": plain["facade"]["p50_ms"] - plain["direct"]["p50_ms"],
        "p99_ms": plain["facade"]["p99_ms"] - plain["direct"]["p99_ms"],
        "ttft_p50_ms": streamed["facade"]["ttft_p50_ms"] - streamed["direct"]["ttft_p50_ms"],
        "ttft_p99_ms": streamed["facade"]["ttft_p99_ms"] - streamed["direct"]["ttft_p99_ms"],
    }
    added = out["added"]
    out["wrong_answers"] = [
        {"kind": kind, "target": target, "job": r["job"], "text": r["wrong"]}
        for (kind, target), rs in samples.items()
        for r in rs
        if r["wrong"]
    ]
    out["pass"] = {
        "answers_whole": not out["wrong_answers"],
        "added_p50": added["p50_ms"] <= GOALS_MS["added_p50"],
        "added_p99": added["p99_ms"] <= GOALS_MS["added_p99"],
        "added_ttft_p50": added["ttft_p50_ms"] <= GOALS_MS["added_ttft_p50"],
    }
    return out


def report(args: argparse.Namespace, summary: dict, per_round: list[dict], where: dict, load: float) -> None:
    print()
    print(
        f"OpenAI façade: AsyncOpenAI, {args.concurrency} in flight, {args.requests} completions per target, kind "
        f"and round, {args.rounds} rounds; gunicorn -w {args.workers} (uvicorn), 1 rqworker "
        f"(MAX_CONCURRENCY={args.max_concurrency}); {os.cpu_count()} CPUs, load average before {load:.2f}"
    )
    print(f"{'':<22}{'p50 ms':>9}{'p99 ms':>9}{'TTFT p50':>10}{'TTFT p99':>10}")
    for kind in ("plain", "stream"):
        for target in ("direct", "facade"):
            r = summary[kind][target]
            ttft = f"{r['ttft_p50_ms']:>10.1f}{r['ttft_p99_ms']:>10.1f}" if kind == "stream" else ""
            print(f"{kind + ' ' + target:<22}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{ttft}")
    a, ok = summary["added"], summary["pass"]
    print()
    verdict = {True: "PASS", False: "FAIL"}
    print(f"added p50:       {a['p50_ms']:7.1f} ms  (goal <= {GOALS_MS['added_p50']:g})  {verdict[ok['added_p50']]}")
    print(f"added p99:       {a['p99_ms']:7.1f} ms  (goal <= {GOALS_MS['added_p99']:g})  {verdict[ok['added_p99']]}")
    print(
        f"added TTFT p50:  {a['ttft_p50_ms']:7.1f} ms  (goal <= {GOALS_MS['added_ttft_p50']:g})  "
        f"{verdict[ok['added_ttft_p50']]}   (TTFT p99 added {a['ttft_p99_ms']:.1f} ms)"
    )
    print("CPU ms per completion (median of rounds):")
    for phase, by in summary["cpu_ms_per_completion"].items():
        print(f"  {phase:<16}" + "".join(f"{name} {ms:6.2f}   " for name, ms in by.items()))
    if summary["wrong_answers"]:
        print(f"WRONG ANSWERS: {len(summary['wrong_answers'])} (FAIL); first ones:")
        for w in summary["wrong_answers"][:5]:
            print(f"  {w['kind']} {w['target']} job {w['job']}: {w['text']!r}")
    rounds = ", ".join(f"{r['added_p50_ms']:.1f}/{r['added_p99_ms']:.1f}" for r in per_round)
    print(f"per round added p50/p99 (ms): {rounds}")
    if where:
        print("façade jobs (plain), from the job rows, p50 / p99 ms:")
        names = {
            "created": "client send -> row created_at",
            "queued": "created_at -> started_at (queue, dequeue, claim)",
            "ran": "started_at -> finished_at (backend call, outcome)",
            "answered": "finished_at -> client has the answer",
        }
        for k, label in names.items():
            if k in where:
                print(f"  {label:<52}{where[k]['p50']:>8.1f}{where[k]['p99']:>8.1f}")


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    load_avg = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="llmo-bench-facade-"))
    conn = fake = server = worker = None
    try:
        conn = redis_conn(args)
        flush_bench_db(conn)
        fake, fake_url = start_fake()
        env = server_env(args, tmp, PYTHONDONTWRITEBYTECODE="1")
        manage(env, "migrate", "--noinput", "-v", "0")
        token = json.loads(manage(env, "bootstrap_demo", "--json").strip().splitlines()[-1])["token"]
        manage(env, "shell", "-c", BACKEND_SETUP.format(url=fake_url))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_gunicorn(args, env, port, tmp / "gunicorn.log", server="asgi")
        worker = start_worker(env, args.max_concurrency, tmp / "worker.log")
        wait_ready(server, base, tmp / "gunicorn.log")
        # Direct: the backend's model name; through us: the backend's name (a pin, no routing choice).
        targets = {"direct": (fake_url, "unused", "gpt-test"), "facade": (base + "/v1", token, BACKEND)}
        print(f"fake on {fake_url}, gunicorn on {base}; warming up...", flush=True)
        for target in targets.values():
            for stream in (False, True):
                asyncio.run(load(target, args.warmup, args.concurrency, stream))

        samples: dict[tuple[str, str], list[dict]] = {}
        per_round = []
        # CPU time per completion of each process (ms): says which one the time goes to when it is busy.
        procs = {"web": worker_pids(server.pid), "worker": [worker.pid], "fake": [fake.pid], "client": None}
        cpu: dict[tuple[str, str], dict[str, list[float]]] = {}
        for i in range(args.rounds):
            order = list(targets) if i % 2 == 0 else list(reversed(targets))
            this: dict[tuple[str, str], list[dict]] = {}
            for kind, stream in (("plain", False), ("stream", True)):
                for target in order:
                    before = cpu_now(procs)
                    rs = asyncio.run(load(targets[target], args.requests, args.concurrency, stream))
                    after = cpu_now(procs)
                    for name in procs:
                        if before[name] is not None and after[name] is not None:
                            cpu.setdefault((kind, target), {}).setdefault(name, []).append(
                                (after[name] - before[name]) * 1e3 / len(rs)
                            )
                    this[(kind, target)] = rs
                    samples.setdefault((kind, target), []).extend(rs)
                    ms = [r["ms"] for r in rs]
                    extra = f", TTFT p50 {pct([r['ttft_ms'] for r in rs], 50):.1f}" if stream else ""
                    wrong = sum(bool(r["wrong"]) for r in rs)
                    extra += f", {wrong} WRONG ANSWERS" if wrong else ""
                    print(
                        f"  round {i + 1} {kind:<6} {target:<6}: p50 {pct(ms, 50):.1f} ms, "
                        f"p99 {pct(ms, 99):.1f} ms{extra}",
                        flush=True,
                    )
            s = summarize(this)
            per_round.append({"added_p50_ms": s["added"]["p50_ms"], "added_p99_ms": s["added"]["p99_ms"]})
        if server.poll() is not None or worker.poll() is not None:
            raise BenchError("gunicorn or the worker died during the run")
        summary = summarize(samples)
        summary["cpu_ms_per_completion"] = {
            f"{kind} {target}": {name: statistics.median(v) for name, v in by.items()}
            for (kind, target), by in cpu.items()
        }
        where = phases(tmp / "bench.sqlite3", samples[("plain", "facade")])
        report(args, summary, per_round, where, load_avg)
        for name in ("gunicorn.log", "worker.log"):
            text = (tmp / name).read_text(errors="replace").strip()
            if text:
                print(f"\n{name} (last lines):\n{text[-1500:]}")
        if args.json_path:
            doc = {
                "benchmark": "OpenAI façade added latency",
                "config": {k: v for k, v in vars(args).items() if k != "json_path"},
                "host": {"cpus": os.cpu_count(), "load_average_before": load_avg, "python": platform.python_version()},
                "goals_ms": GOALS_MS,
                "per_round": per_round,
                "phases_ms": where,
                **summary,
            }
            Path(args.json_path).write_text(json.dumps(doc, indent=2) + "\n")
        return 0 if all(summary["pass"].values()) else 1
    except BenchError as exc:
        print(f"benchmark could not run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        stop_gunicorn(server)
        stop_worker(worker)
        stop_fake(fake)
        clean_up(conn, tmp, args.keep)


if __name__ == "__main__":
    sys.exit(main())
