"""Starting a whole fleet on the rig (tests/fleet/rig.py): its database, Redis, the project's processes, a user.

Used by the ``fleet`` fixture (tests/fleet/conftest.py) and by the benchmarks that reuse the rig
(``bench/fleet_soak.py``, ``bench/fleet_scale.py``)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import dj_database_url
import psycopg
from django.db import connections

from tests.fleet import rig
from tests.fleet.client import DB
from tests.fleet.soak import SOAK_BACKENDS

FLEET_DB = "llmo_fleet"

# Short heartbeats and a quick reconcile pass, as the crash tests use; a lease (5 s) longer than a
# Sentinel failover (about 2 to 3 s here), so that a failover alone never presumes a worker dead.
WORKER_ENV = {
    "WORKER_HEARTBEAT_MS": "500",
    "WORKER_LEASE_TTL_MS": "5000",
    "RECONCILE_INTERVAL_MS": "1000",
    "MAX_CONCURRENCY": "4",
    "LOG_LEVEL": "WARNING",
}
KEY_TTLS = {"IDEMPOTENCY_TTL_S": "30", "JOB_STATUS_CACHE_TTL_S": "30", "STREAM_TTL_S": "30"}
JOB_LATENCY_MS = 1000  # each dev call takes this long: kills and cuts find jobs mid-run


SETUP = """
from django.contrib.auth.models import User
from rest_framework.authtoken.models import Token
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
user = User.objects.create_user("fleet", password="pw-fleet-123")
Backend.objects.create(name="dev", kind=BackendKind.DEV, config={"latency_ms": LATENCY_MS})
for name, config in SOAK_BACKENDS.items():
    Backend.objects.create(name=name, kind=BackendKind.DEV, config=config)
policies.activate(RoutingPolicy.objects.create(name="fleet", strategy="ordered", params={"order": ["dev"]}))
print("TOKEN", Token.objects.create(user=user).key)
""".replace("LATENCY_MS", str(JOB_LATENCY_MS)).replace("SOAK_BACKENDS", repr(SOAK_BACKENDS))


def pg_server_url() -> str:
    """The PostgreSQL server ``make test`` uses for its second run (tools/test.sh)."""
    return os.environ.get("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")


def fresh_database(server: str) -> str:
    """(Re)create the fleet's own database on ``server``; returns its URL (in the root namespace)."""
    with psycopg.connect(server, dbname="postgres", autocommit=True, connect_timeout=3) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {FLEET_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {FLEET_DB}")
    parts = urlsplit(server)
    return urlunsplit(parts._replace(path=f"/{FLEET_DB}"))


def drop_database(server: str) -> None:
    with psycopg.connect(server, dbname="postgres", autocommit=True, connect_timeout=3) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {FLEET_DB} WITH (FORCE)")


def manage(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=rig.ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"manage.py {args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def unavailable() -> str | None:
    """Why no fleet can start here (a reason to skip), or None."""
    why = rig.missing_requirements()
    if why:
        return f"the fleet rig {why}"
    if rig.postgres_bin() is None:
        server = pg_server_url()
        try:
            psycopg.connect(server, dbname="postgres", connect_timeout=3).close()
        except psycopg.OperationalError as exc:
            return f"the fleet rig needs PostgreSQL binaries or a server at TEST_DATABASE_URL ({server}): {exc}"
    return None


@contextmanager
def booted(workers: Iterable[str] = rig.Fleet.WORKERS, worker_env: dict[str, str] | None = None) -> Iterator[rig.Fleet]:
    """Two web hosts, the ``workers`` hosts, Redis primary + replica + three Sentinels, one PostgreSQL.

    The fleet has a database of its own (``llmo_fleet``), as hosts that share no disk need: not
    SQLite, and not the test run's database, whose per-test flushes would pull the rows from under
    running processes. It lives on a PostgreSQL server of the rig's own (the ``pg`` host) where the
    binaries are installed, else on the server of ``TEST_DATABASE_URL`` (made afresh, dropped at the
    end; a PostgreSQL restart is then played by cutting the forwarder). One rig per machine at a time
    (fixed names, so that a killed run's leftovers are removed at the next start).
    """
    workers = list(workers)
    rig.clean_stale()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    # Keys of finished jobs expire within the short soak (production: an hour and a day), so that it
    # sees Redis memory reach its steady state: about rate x TTL x bytes per job. DEBUG off, as in
    # production: with it on, Django keeps the last 9,000 queries of every connection, which a worker
    # fills over its first ~15,000 jobs (+14 MiB; bench/worker_rss.py --debug) and the soak read as growth.
    env.update(DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50), LOG_LEVEL="WARNING", **KEY_TTLS)
    pg_bin = rig.postgres_bin()
    server = pg_server_url()
    fleet = rig.Fleet("", env, own_postgres=pg_bin is not None)
    try:
        if pg_bin is not None:  # a server of its own, on the ``pg`` host: a test may stop it
            local_url = fleet_url = fresh_database(fleet.init_postgres(pg_bin))
        else:  # the machine's server, through a forwarder at the gateway
            local_url = fresh_database(server)
            host = urlsplit(local_url).hostname or ""
            fleet_url = local_url.replace(f"@{host}:", f"@{rig.GATEWAY}:", 1)
            fleet.start_pg_forwarder()
        fleet.use_database(fleet_url)
        fleet.local_database_url = local_url  # type: ignore[attr-defined]
        manage({**fleet.base_env, "DATABASE_URL": local_url}, "migrate", "-v0")
        fleet.start_redis()
        out = manage(fleet.base_env, "shell", "-c", SETUP)
        fleet.token = out.split("TOKEN", 1)[1].split()[0]  # type: ignore[attr-defined]
        for name in rig.Fleet.WEBS:
            fleet.start_web(name)
        for name in workers:
            fleet.start_worker(name, **(WORKER_ENV if worker_env is None else worker_env))
        for name in rig.Fleet.WEBS:
            fleet.wait_web(name)
        wait_workers(fleet, len(workers), names=workers)
        add_alias(local_url)
        yield fleet
    finally:
        if DB in connections.settings:
            connections[DB].close()
        fleet.tear_down()
        if pg_bin is None:
            drop_database(server)


def add_alias(url: str) -> None:
    """The fleet's database as the ``fleet`` alias of this process (the tests read its rows)."""
    connections.settings[DB] = connections.configure_settings({**connections.settings, DB: dj_database_url.parse(url)})[
        DB
    ]


def wait_workers(fleet: rig.Fleet, n: int, timeout: float = 90, names: Iterable[str] = rig.Fleet.WORKERS) -> None:
    """Until ``n`` RQ workers have registered (each has read its settings and reached Redis)."""
    client = fleet.redis()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.scard("rq:workers") >= n:
            return
        for name in names:
            proc = fleet.hosts[name].procs[-1]
            if proc.poll() is not None:
                raise RuntimeError(f"worker on {name} exited:\n{fleet.logs(name)}")
        time.sleep(0.3)
    raise RuntimeError(f"fewer than {n} workers registered in {timeout:g} s")
