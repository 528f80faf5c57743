"""JSON log lines: the fields operators search by, LOG_LEVEL, and no secrets anywhere in them."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from jobs.models import Job, JobState
from orchestrator_site.logs import REDACTED, JsonFormatter
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import ROOT, free_port, process_env, run_worker_burst

SECRET = "sk-live-DO-NOT-LOG-9f8e7d6c5b4a"


def json_lines(text: str) -> list[dict]:
    """Every line that is JSON (rq's own banner lines on stderr are plain text)."""
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_backend_api_key_never_appears_in_any_log_output(api, caplog):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: every call is a connection error
    Backend.objects.create(
        name="openai-dead",
        kind=BackendKind.OPENAI,
        base_url=dead,
        model="gpt-test",
        api_key=SECRET,
        timeout_s=5,
        config={"retry_max": 1, "retry_base_ms": 10},
    )
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["openai-dead"]}))
    caplog.set_level(logging.DEBUG)
    r = api.post("/jobs", {"prompt": "hello"}, format="json")
    assert r.status_code == 202
    job_id = r.json()["id"]

    proc = run_worker_burst(LOG_LEVEL="DEBUG")  # everything the worker process says, at its most verbose

    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.FAILED
    output = proc.stdout + proc.stderr + caplog.text
    assert SECRET not in output
    assert SECRET[-12:] not in output  # not even a fragment
    lines = json_lines(proc.stdout)
    mine = [line for line in lines if line.get("job_id") == job_id]
    assert mine, proc.stdout[-2000:]
    assert any(line.get("backend") == "openai-dead" and "attempt" in line for line in mine)
    assert all({"ts", "level", "logger", "event"} <= line.keys() for line in lines)
    assert any(line["level"] == "DEBUG" for line in lines)  # LOG_LEVEL=DEBUG reached the worker


@pytest.mark.parametrize(("level", "shown"), [("ERROR", ["error"]), ("INFO", ["info", "warning", "error"])])
def test_log_level_is_honoured(level, shown):
    code = (
        "import logging; log = logging.getLogger('llmo.check'); "
        "log.debug('debug'); log.info('info'); log.warning('warning'); log.error('error')"
    )
    env = process_env(LOG_LEVEL=level, DATABASE_URL="sqlite:///:memory:")
    proc = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    events = [line["event"] for line in json_lines(proc.stdout) if line["logger"] == "llmo.check"]
    assert events == shown


def test_bad_log_level_fails_at_start_up():
    env = process_env(LOG_LEVEL="LOUD", DATABASE_URL="sqlite:///:memory:")
    proc = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "LOG_LEVEL" in proc.stderr


def format_one(**extra) -> dict:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("llmo.format-test")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("job failed", extra=extra)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    (line,) = stream.getvalue().splitlines()
    return json.loads(line)


def test_context_fields_are_top_level_json():
    doc = format_one(job_id="j1", policy="p", backend="b", attempt=2, prompt_tokens=7)
    assert doc["event"] == "job failed" and doc["level"] == "WARNING"
    assert (doc["job_id"], doc["policy"], doc["backend"], doc["attempt"], doc["prompt_tokens"]) == (
        "j1",
        "p",
        "b",
        2,
        7,
    )
    assert "trace_id" not in doc  # tracing is off: no empty ids


def test_fields_named_like_secrets_are_redacted():
    doc = format_one(api_key=SECRET, authorization=f"Bearer {SECRET}", openai_api_key=SECRET, password=SECRET)
    assert SECRET not in json.dumps(doc)
    assert doc["api_key"] == doc["authorization"] == doc["openai_api_key"] == doc["password"] == REDACTED


@pytest.mark.django_db(transaction=True)
def test_worker_log_level_reaches_rqs_own_lines():
    quiet = run_worker_burst(LOG_LEVEL="WARNING")
    chatty = run_worker_burst(LOG_LEVEL="INFO")
    info_from_rq = [
        line for line in json_lines(quiet.stdout) if line["logger"].startswith("rq.") and line["level"] == "INFO"
    ]
    assert info_from_rq == []  # rqworker's default verbosity no longer sets rq.worker back to INFO
    assert any(line["logger"].startswith("rq.") for line in json_lines(chatty.stdout))
