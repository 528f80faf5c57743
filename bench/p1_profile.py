#!/usr/bin/env python3
"""Where does ``POST /jobs`` spend its time? An in-process companion to ``p1_submit.py``.

    .venv/bin/python bench/p1_profile.py [-n 2000] [--profile api|bare|none] [--top 40]

Same set-up as P1 (temporary SQLite, Redis db 14 flushed before and after, DEBUG=0,
``ROOT_URLCONF=bench.urls``), but requests go through Django's WSGI handler in this
process (full middleware stack, no HTTP server, no network client), so the numbers are
the application's own CPU cost per request. Prints the mean time per request for each
endpoint, the ratio, the Redis commands each request sends and the SQL it runs, then a
cProfile of the chosen endpoint sorted by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REDIS_DB = 14
BODY = json.dumps({"prompt": "Say hello in one short sentence.", "priority": "normal"}).encode()


def environ(path: str, headers: dict[str, str]) -> dict:
    env = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "HTTP_HOST": "127.0.0.1:8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(BODY)),
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(BODY),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for k, v in headers.items():
        env["HTTP_" + k.upper().replace("-", "_")] = v
    return env


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2000, help="requests per endpoint (default 2000)")
    p.add_argument("--profile", choices=("api", "bare", "none"), default="api")
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--sort", default="cumulative", help="pstats sort key (cumulative, tottime)")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="llmo-bench-prof-"))
    (tmp / "static").mkdir()
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "orchestrator_site.settings",
            "ROOT_URLCONF": "bench.urls",
            "VAR_DIR": str(tmp),
            "DATABASE_URL": f"sqlite:///{tmp / 'bench.sqlite3'}",
            "REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
            "DEBUG": "0",
            "SECRET_KEY": secrets.token_urlsafe(50),
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "LOG_LEVEL": "WARNING",
            "STATIC_ROOT": str(tmp / "static"),
        }
    )
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command
    from django.core.wsgi import get_wsgi_application
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from orchestrator_site.redis import redis_client

    client = redis_client()
    assert client.connection_pool.connection_kwargs["db"] == REDIS_DB
    client.flushdb()
    try:
        call_command("migrate", "--noinput", verbosity=0)
        out = io.StringIO()
        call_command("bootstrap_demo", "--json", stdout=out)
        token = json.loads(out.getvalue().strip().splitlines()[-1])["token"]
        app = get_wsgi_application()
        counter = iter(range(10**9))

        def call(mode: str) -> str:
            if mode == "api":
                env = environ("/jobs", {"Authorization": f"Token {token}", "Idempotency-Key": f"k{next(counter)}"})
            else:
                env = environ("/bench/bare-submit", {})
            status = []
            body = b"".join(app(env, lambda s, h, exc=None: status.append(s)))
            if not status[0].startswith("202"):
                raise SystemExit(f"{mode}: {status[0]} {body[:500]!r}")
            return status[0]

        for mode in ("bare", "api"):  # warm up (imports, registry snapshot, queue objects, scripts)
            for _ in range(50):
                call(mode)

        # Redis commands and SQL per request.
        for mode in ("bare", "api"):
            with CaptureQueriesContext(connection) as q:
                sent = _count_redis(client, lambda m=mode: call(m))
            print(f"{mode}: {len(q.captured_queries)} SQL statements, Redis: {sent}")
            for s in q.captured_queries:
                print(f"    {s['sql'][:150]}")

        means = {}
        for mode in ("bare", "api", "bare", "api"):
            t0 = time.perf_counter()
            for _ in range(args.n):
                call(mode)
            means.setdefault(mode, []).append((time.perf_counter() - t0) / args.n * 1e3)
        best = {m: min(v) for m, v in means.items()}
        print(
            f"\nin-process mean per request (best of 2 x {args.n}): bare {best['bare']:.3f} ms, "
            f"api {best['api']:.3f} ms -> throughput ratio bound {best['bare'] / best['api']:.2f}"
        )

        if args.profile != "none":
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.n):
                call(args.profile)
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).strip_dirs().sort_stats(args.sort).print_stats(args.top)
            print(f"\ncProfile of {args.n} x {args.profile} (sorted by {args.sort}):")
            print(s.getvalue())
    finally:
        client.flushdb()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _count_redis(client, fn) -> str:
    """Round trips and commands sent by ``fn``, counted by wrapping the pool's connections."""
    from redis.connection import Connection

    trips: list[list[str]] = []
    orig_one, orig_many = Connection.send_command, Connection.send_packed_command

    def send_command(self, *a, **kw):
        trips.append([str(a[0])])
        return orig_one(self, *a, **kw)

    Connection.send_command = send_command
    pipes: list[list[str]] = []
    from redis.client import Pipeline

    orig_exec = Pipeline._execute_pipeline
    orig_exec_tx = Pipeline._execute_transaction

    def ex(self, connection, commands, raise_on_error):
        pipes.append([str(c[0][0]) for c in commands])
        return orig_exec(self, connection, commands, raise_on_error)

    def ex_tx(self, connection, commands, raise_on_error):
        pipes.append(["MULTI", *(str(c[0][0]) for c in commands), "EXEC"])
        return orig_exec_tx(self, connection, commands, raise_on_error)

    Pipeline._execute_pipeline, Pipeline._execute_transaction = ex, ex_tx
    try:
        fn()
    finally:
        Connection.send_command, Connection.send_packed_command = orig_one, orig_many
        Pipeline._execute_pipeline, Pipeline._execute_transaction = orig_exec, orig_exec_tx
    return f"{len(trips) + len(pipes)} round trips: single {[t[0] for t in trips]}, pipelines {pipes}"


if __name__ == "__main__":
    sys.exit(main())
