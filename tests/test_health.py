"""/healthz and /readyz answer without auth; readyz says what is not ready."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, process_env


def test_healthz_needs_no_auth(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert client.get("/healthz/").status_code == 200


@pytest.mark.django_db
def test_readyz_checks_database_and_redis(client):
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}


def readyz_in_process(**env: str) -> tuple[int, dict, str]:
    """GET /readyz in a fresh process with ``env`` overrides; (status, body, the process's log)."""
    code = (
        "import django; django.setup();"
        "from django.test import Client; r = Client().get('/readyz');"
        "import json; print('READYZ', r.status_code, json.dumps(r.json()))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=process_env(**env), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    _, status, body = lines[-1].split(" ", 2)
    return int(status), json.loads(body), "\n".join(lines[:-1]) + proc.stderr


@pytest.mark.django_db(transaction=True)
def test_readyz_is_503_naming_redis_when_redis_is_down():
    status, body, log = readyz_in_process(REDIS_URL="redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert status == 503
    assert body == {"status": "not ready", "checks": {"database": "ok", "redis": "down"}}
    assert "127.0.0.1:1" in log or "Connection refused" in log  # the reason goes to the log


@pytest.mark.django_db(transaction=True)
def test_readyz_never_shows_the_database_error_text():
    # The driver's message names the host, port and user; an unauthenticated caller sees none of it.
    status, body, log = readyz_in_process(DATABASE_URL="postgres://readyz-secret-user@127.0.0.1:1/readyz_db")
    assert status == 503
    assert body == {"status": "not ready", "checks": {"database": "down", "redis": "ok"}}
    assert "readyz-secret-user" not in json.dumps(body)
    assert "dependency down" in log and "database" in log and "OperationalError" in log
