"""Shared fixtures: a real Redis database flushed per test, users, a seeded registry, and
helpers that start real worker and web processes against the test database."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from django.conf import settings
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from jobs import queueing, status_mirror
from orchestrator_site.redis import redis_client
from routing import policies, registry
from routing import services as routing_services
from routing.models import Backend, BackendKind, RoutingPolicy

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def redis_db() -> Iterator:
    """A clean Redis database and clean per-process caches for every test."""
    client = redis_client()
    assert client.connection_pool.connection_kwargs.get("db", 0) != 0 or os.environ.get("TEST_REDIS_URL"), (
        "refusing to flush Redis db 0; set TEST_REDIS_URL explicitly to use it"
    )
    client.flushdb()
    registry._snapshot = None
    routing_services._stats_cache.clear()
    queueing._queues.clear()
    status_mirror._script = None
    yield client
    client.flushdb()


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser("root", password="pw-root-123")


def token_client(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


@pytest.fixture
def admin_client(client, staff):
    """The Django test client logged in as the `staff` superuser (replaces pytest-django's own)."""
    client.force_login(staff)
    return client


@pytest.fixture
def api(user) -> APIClient:
    return token_client(user)


@pytest.fixture
def staff_api(staff) -> APIClient:
    return token_client(staff)


@pytest.fixture
def dev_backend(db) -> Backend:
    return Backend.objects.create(name="dev", kind=BackendKind.DEV, config={"latency_ms": 0})


@pytest.fixture
def policy(db, dev_backend) -> RoutingPolicy:
    p = RoutingPolicy.objects.create(name="default", strategy="ordered", params={"order": ["dev"]})
    policies.activate(p)
    return p


# --- real processes ----------------------------------------------------------------
def database_url() -> str:
    """The URL of the test database as it exists now (call inside a transactional test)."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    auth = quote(s["USER"] or "")
    if s.get("PASSWORD"):
        auth += ":" + quote(s["PASSWORD"])
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def process_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="orchestrator_site.settings",
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
        LOG_LEVEL=os.environ.get("TEST_PROCESS_LOG_LEVEL", "WARNING"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_worker_burst(*queues: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`manage.py rqworker <queues> --burst` in a real process: drains the queues, then exits."""
    cmd = [sys.executable, "manage.py", "rqworker", *(queues or settings.JOB_QUEUES), "--burst"]
    proc = subprocess.run(cmd, cwd=ROOT, env=process_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"worker exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def submit_jobs(api: APIClient, n: int, **body) -> list[str]:
    """Submit ``n`` jobs (prompts "job 0", "job 1", …) through POST /jobs; returns their ids."""
    ids = []
    for i in range(n):
        r = api.post("/jobs", {"prompt": f"job {i}", **body}, format="json")
        assert r.status_code == 202, r.content
        ids.append(r.json()["id"])
    return ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gunicorn_server(transactional_db) -> Iterator:
    """Start gunicorn (uvicorn worker processes, as `make run`) on the test database; yields a base-URL factory."""
    procs: list[subprocess.Popen] = []

    def start(workers: int = 3) -> str:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "orchestrator_site.asgi:application",
            "-k",
            "uvicorn_worker.UvicornWorker",
            "-w",
            str(workers),
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
        ]
        log_path = Path(settings.VAR_DIR) / f"web-{port}-{time.monotonic_ns()}.log"
        with open(log_path, "w") as out:  # a file, not a pipe nobody reads (a full pipe would stall the server)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=process_env(), stdout=out, stderr=subprocess.STDOUT)
        proc.log_path = log_path  # type: ignore[attr-defined]
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return base
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"gunicorn exited: {log_path.read_text()}") from None
                time.sleep(0.1)
        raise RuntimeError("gunicorn did not start within 30 s")

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def worker_process() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start long-running `manage.py rqworker high normal low` processes (env overrides as kwargs,
    ``worker_class`` for ``--worker-class``).

    Output goes to a file per process (``proc.log_path``), read back on failure; at the end each
    still running gets SIGTERM, then SIGKILL if it does not exit.
    """
    procs: list[subprocess.Popen] = []

    def start(*queues: str, worker_class: str | None = None, **env: str) -> subprocess.Popen:
        cmd = [sys.executable, "manage.py", "rqworker", *(queues or settings.JOB_QUEUES)]
        if worker_class:
            cmd += ["--worker-class", worker_class]
        log_path = Path(settings.VAR_DIR) / f"worker-{len(procs)}-{time.monotonic_ns()}.log"
        with open(log_path, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=process_env(**env), stdout=out, stderr=subprocess.STDOUT)
        proc.log_path = log_path  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def private_redis() -> Iterator:
    """A Redis server of this test's own (no persistence) that the test may kill and restart."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc: list[subprocess.Popen] = []

    def start() -> None:
        cmd = [server, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
        proc.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def restart() -> None:
        """Kill -9 (everything in memory is lost), then start an empty server on the same port."""
        proc[-1].kill()
        proc[-1].wait()
        start()

    start()
    yield SimpleNamespace(url=f"redis://127.0.0.1:{port}/0", restart=restart)
    for p in proc:
        if p.poll() is None:
            p.kill()
            p.wait()


# --- which tests run on the second database ---------------------------------------------
# Fixtures through which a test reaches the database (pytest-django's own, and ours that start
# processes against it). ``item.fixturenames`` holds every fixture a test requests, directly or
# through other fixtures; pytest-django's ``django_db_blocker`` is in every test's, so it says nothing.
DATABASE_FIXTURES = frozenset({"db", "transactional_db", "live_server", "gunicorn_server", "worker_process"})


def uses_database(item: pytest.Item) -> bool:
    if item.get_closest_marker("django_db") is not None:
        return True
    names = getattr(item, "fixturenames", ())
    return any(
        name in DATABASE_FIXTURES or (name.startswith("django_db_") and name != "django_db_blocker") for name in names
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On PostgreSQL, leave out the tests that never touch a database: the SQLite run covers them.

    ``make test`` runs the suite on SQLite, then on PostgreSQL to catch what differs between the
    databases; a test without a database answers the same on both, so running it twice only costs time.
    Deselected, not skipped: they were not meant to run here, and nothing is hidden in the skip count.
    """
    if connection.vendor != "postgresql":
        return
    kept = [item for item in items if uses_database(item)]
    left_out = [item for item in items if not uses_database(item)]
    if left_out:
        items[:] = kept
        config.hook.pytest_deselected(items=left_out)
    config.stash[_DATABASE_FREE] = len(left_out)


_DATABASE_FREE = pytest.StashKey[int]()


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    count = config.stash.get(_DATABASE_FREE, 0)
    if not count:
        return []
    return [
        f"{count} tests need no database: run on SQLite only"
        if count > 1
        else "1 test needs no database: run on SQLite only"
    ]


def pytest_sessionfinish(session, exitstatus) -> None:
    """Remove the run's scratch folder (test SQLite file, static root) made by tests/settings.py."""
    var = Path(settings.VAR_DIR)
    if var.name.startswith("llmo-test-var-"):
        shutil.rmtree(var, ignore_errors=True)
