"""The ``llmo`` command against a live server (tests/live_stack.py), run as a real process: its output,
its --json documents and its exit status (0 done, 1 the job or batch did not succeed, 2 usage, 3 an API
error, 4 not finished). The batch commands need /v1/files and /v1/batches (marker ``needs_batches``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.models import Job, JobState
from tests import live_stack
from tests.conftest import ROOT
from tests.live_stack import slow_prompt


@pytest.fixture
def stack(gunicorn_server, worker_process, user) -> dict:
    return live_stack.start(gunicorn_server, worker_process, user)


def llmo(stack: dict | None, *args: str, token: str | None = None, stdin: str | None = None, timeout: float = 60):
    """``python -m llmo ARGS`` with LLMO_URL and LLMO_TOKEN of ``stack`` (the client from client/, installed or not)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMO_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "client"), env.get("PYTHONPATH")]))
    if stack is not None:
        env["LLMO_URL"] = stack["base"]
        env["LLMO_TOKEN"] = token if token is not None else stack["token"]
    return subprocess.run(
        [sys.executable, "-m", "llmo", *args], env=env, input=stdin, capture_output=True, text=True, timeout=timeout
    )


def test_submit_wait_prints_the_output_and_json_documents_round_trip(stack):
    done = llmo(stack, "submit", "hello there", "--priority", "high", "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello there\n" and "accepted" in done.stderr
    job = Job.objects.get()
    assert job.priority == "high" and job.state == JobState.SUCCEEDED

    queued = llmo(stack, "--json", "submit", "-", "--metadata", "ticket=42", "--max-tokens", "20", stdin="from stdin")
    doc = json.loads(queued.stdout)
    assert queued.returncode == 0 and doc["state"] == "queued" and doc["metadata"] == {"ticket": 42}
    result = llmo(stack, "result", doc["id"], "--wait", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["output"] == "from stdin"
    got = llmo(stack, "get", doc["id"])
    assert got.returncode == 0 and "succeeded" in got.stdout and doc["id"] in got.stdout
    plain = llmo(stack, "submit", "just the id")
    assert plain.returncode == 0 and plain.stdout.strip() == str(Job.objects.latest("created_at").pk)


def test_jobs_lists_with_filters_and_a_failed_job_exits_1(stack):
    failed = llmo(stack, "submit", "x", "--backend", "broken", "--wait")
    assert failed.returncode == 1 and failed.stdout == "" and "failed" in failed.stderr
    assert llmo(stack, "submit", "fine", "--wait").returncode == 0
    listed = llmo(stack, "jobs", "--state", "failed", "--json")
    (only,) = json.loads(listed.stdout)
    assert only["state"] == "failed" and only["backend"] == "broken"
    table = llmo(stack, "jobs").stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "STATE", "PRIORITY"] and len(table) == 3
    assert llmo(stack, "jobs", "--limit", "1", "--json").stdout.count('"id"') == 1


def test_cancel_stream_and_the_exit_status_of_each_error(stack):
    job_id = llmo(stack, "submit", slow_prompt(30)).stdout.strip()
    canceled = llmo(stack, "cancel", job_id)
    assert canceled.returncode == 0 and "canceled" in canceled.stdout
    again = llmo(stack, "cancel", job_id)
    assert again.returncode == 3 and "409" in again.stderr and "canceled" in again.stderr
    assert llmo(stack, "result", job_id).returncode == 1  # ended, not succeeded

    streamed = llmo(stack, "submit", "a b c d", "--stream")
    assert streamed.returncode == 0 and streamed.stdout == "a b c d\n"
    stream_id = Job.objects.latest("created_at").pk
    events = [json.loads(line) for line in llmo(stack, "--json", "stream", str(stream_id)).stdout.splitlines()]
    assert [e["event"] for e in events] == ["delta"] * 4 + ["end"] and events[-1]["data"]["output"] == "a b c d"

    long_id = llmo(stack, "submit", slow_prompt(20)).stdout.strip()
    late = llmo(stack, "wait", long_id, "--wait-timeout", "1")
    assert late.returncode == 4 and "still" in late.stderr
    assert llmo(stack, "result", long_id).returncode == 4
    llmo(stack, "cancel", long_id)

    missing = llmo(stack, "get", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 3 and "404" in missing.stderr
    bad = llmo(stack, "submit", "x", "--max-tokens", "0")
    assert bad.returncode == 3 and "max_tokens" in bad.stderr
    anonymous = llmo(stack, "get", "00000000-0000-0000-0000-000000000000", token="")
    assert anonymous.returncode == 3 and "401" in anonymous.stderr and "LLMO_TOKEN" in anonymous.stderr
    assert llmo(stack, "submit", "x", "--priority", "urgent").returncode == 2
    assert llmo(stack, "submit").returncode == 2


def test_the_installed_llmo_command_runs():
    script = Path(sys.executable).parent / "llmo"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith("llmo ")
    nowhere = subprocess.run(
        [str(script), "--url", "http://127.0.0.1:9", "--token", "t", "--retries", "0", "get", "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert nowhere.returncode == 3 and "127.0.0.1:9" in nowhere.stderr


@pytest.mark.needs_batches
def test_batch_submit_wait_writes_results_and_errors(stack, tmp_path):
    requests = tmp_path / "requests.jsonl"
    lines = [("a", "dev"), ("b", "dev"), ("c", "broken")]
    requests.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": cid,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": model, "messages": [{"role": "user", "content": f"say {cid}"}]},
                }
            )
            + "\n"
            for cid, model in lines
        )
    )
    out, errors = tmp_path / "results.jsonl", tmp_path / "errors.jsonl"
    done = llmo(
        stack, "batch", "submit", str(requests), "--wait", "--poll", "0.5", "--out", str(out), "--errors", str(errors)
    )
    assert done.returncode == 1, done.stderr  # one request failed
    results = {json.loads(line)["custom_id"]: json.loads(line) for line in out.read_text().splitlines()}
    assert set(results) == {"a", "b"}
    assert results["b"]["response"]["body"]["choices"][0]["message"]["content"] == "say b"
    assert [json.loads(line)["custom_id"] for line in errors.read_text().splitlines()] == ["c"]
    assert "completed" in done.stderr

    good = tmp_path / "good.jsonl"
    good.write_text("".join(line for line in requests.read_text().splitlines(keepends=True) if '"broken"' not in line))
    ok = llmo(stack, "batch", "submit", str(good), "--wait", "--poll", "0.5", "--out", str(tmp_path / "ok.jsonl"))
    assert ok.returncode == 0, ok.stderr

    slow = tmp_path / "slow.jsonl"
    body = {"model": "dev", "messages": [{"role": "user", "content": slow_prompt(3)}]}
    slow.write_text(
        "".join(
            json.dumps({"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"
            for i in range(10)
        )
    )
    batch_id = llmo(stack, "batch", "submit", str(slow)).stdout.strip()
    shown = llmo(stack, "batch", "get", batch_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == batch_id
    canceled = llmo(stack, "batch", "cancel", batch_id)
    assert canceled.returncode == 0 and "cancel" in canceled.stdout
    ended = llmo(stack, "batch", "wait", batch_id, "--poll", "0.5", "--wait-timeout", "60")
    assert ended.returncode == 1 and "cancelled" in ended.stderr
