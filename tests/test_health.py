"""/healthz and /readyz answer without auth; readyz says what is not ready."""

from __future__ import annotations

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


@pytest.mark.django_db(transaction=True)
def test_readyz_is_503_naming_redis_when_redis_is_down():
    code = (
        "import django; django.setup();"
        "from django.test import Client; r = Client().get('/readyz');"
        "import json; print(r.status_code, json.dumps(r.json()))"
    )
    env = process_env(REDIS_URL="redis://127.0.0.1:1/0")  # nothing listens on port 1
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    status, _, body = proc.stdout.strip().splitlines()[-1].partition(" ")
    assert status == "503"
    assert '"database": "ok"' in body and '"redis": "error' in body
