"""With Redis down, submission answers 503 and leaves nothing half-made; status reads fall back to the DB."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jobs.models import Job
from tests.conftest import ROOT, process_env

pytestmark = pytest.mark.django_db(transaction=True)

CLIENT = """
import django, json, sys
django.setup()
from django.contrib.auth.models import User
from django.test import Client
c = Client()
c.force_login(User.objects.get(username="alice"))
out = []
for method, path, body in json.loads(sys.argv[1]):
    r = getattr(c, method)(path, data=body, content_type="application/json")
    out.append([r.status_code, r.json()])
print(json.dumps(out))
"""


def in_process_without_redis(*calls) -> list:
    env = process_env(REDIS_URL="redis://127.0.0.1:1/0")  # nothing listens on port 1
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, json.dumps(calls)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_submit_with_redis_down_is_503_and_leaves_no_job(user, policy):
    [(status, body)] = in_process_without_redis(["post", "/jobs", {"prompt": "hi"}])
    assert status == 503 and "Redis" in body["detail"]
    assert Job.objects.count() == 0


def test_status_reads_fall_back_to_the_database_when_redis_is_down(api, user, policy):
    job_id = api.post("/jobs", {"prompt": "hi"}, format="json").json()["id"]
    (s1, status), (s2, result) = in_process_without_redis(
        ["get", f"/jobs/{job_id}", None], ["get", f"/jobs/{job_id}/result", None]
    )
    assert (s1, status["id"], status["state"]) == (200, job_id, "queued")
    assert (s2, result["state"]) == (202, "queued")
