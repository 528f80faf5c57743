"""The Batch API with OpenAI's own SDK against the real stack (gunicorn with uvicorn workers, a real
``rqworker``, Redis and the test database; the ``dev`` backend): upload, create, poll, the output and
error files, a malformed file, cancel mid-way, expiry with a short window, and the limits."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import openai
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings
from rest_framework.authtoken.models import Token

from batches.models import Batch
from jobs import fair_queue
from jobs.models import Job, JobState
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tenants.models import ApiKey, Tenant
from tests.conftest import token_client

FINAL = ("completed", "failed", "expired", "cancelled")


def request_line(custom_id: str, content: str, model: str = "echo", **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }


def jsonl(lines: list) -> bytes:
    return b"".join((json.dumps(x) if not isinstance(x, str) else x).encode() + b"\n" for x in lines)


def start_stack(gunicorn_server, worker_process, user, *, token_ms: int = 0, **worker_env: str) -> dict:
    Backend.objects.create(name="dev", kind=BackendKind.DEV, model="echo", config={"token_ms": token_ms})
    Backend.objects.create(name="broken", kind=BackendKind.DEV, config={"fail_rate": 1.0, "fail_status": 400})
    policies.activate(RoutingPolicy.objects.create(name="default", strategy="ordered", params={"order": ["dev"]}))
    base = gunicorn_server(workers=1)
    worker_process(**worker_env)
    return {"base": base, "token": Token.objects.create(user=user).key}


@pytest.fixture
def stack(gunicorn_server, worker_process, user) -> Iterator[dict]:
    yield start_stack(gunicorn_server, worker_process, user)


def sdk(stack: dict, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack['base']}/v1", api_key=key or stack["token"], max_retries=0, timeout=30)


def wait_for(client: openai.OpenAI, batch_id: str, statuses=FINAL, timeout: float = 40):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch still {batch.status}: {batch}")


def lines_of(client: openai.OpenAI, file_id: str) -> dict[str, dict]:
    text = client.files.content(file_id).text
    return {item["custom_id"]: item for item in map(json.loads, text.splitlines())}


def test_a_batch_runs_and_its_output_and_error_files_read_back(stack, django_user_model):
    client = sdk(stack)
    lines = [request_line(f"r{i}", f"hello {i}", max_tokens=20) for i in range(6)]
    lines.append(request_line("bad", "will fail", model="broken"))
    upload = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert (upload.object, upload.purpose, upload.filename) == ("file", "batch", "requests.jsonl")
    assert upload.bytes == len(jsonl(lines)) and client.files.retrieve(upload.id).id == upload.id

    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "ci"}
    )
    assert batch.status == "validating" and batch.metadata == {"run": "ci"}
    done = wait_for(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (7, 6, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.expires_at > done.created_at
    assert done.usage.output_tokens == 12  # two words echoed per line

    out = lines_of(client, done.output_file_id)
    assert sorted(out) == [f"r{i}" for i in range(6)]
    first = out["r0"]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"].startswith("req_")
    completion = first["response"]["body"]
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == "hello 0"
    jobs = Job.objects.filter(batch_id=batch.id)
    assert jobs.count() == 7 and set(jobs.values_list("priority", flat=True)) == {"low"}

    errors = lines_of(client, done.error_file_id)
    assert list(errors) == ["bad"]
    failed = errors["bad"]["response"]
    assert failed["status_code"] == 422 and failed["body"]["error"]["code"] == "job_failed"
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"

    listed = client.batches.list(limit=10)
    assert [b.id for b in listed.data] == [batch.id]
    assert {f.id for f in client.files.list()} == {upload.id, done.output_file_id, done.error_file_id}

    stranger = Token.objects.create(user=django_user_model.objects.create_user("eve", password="pw-eve-12345"))
    other = sdk(stack, key=stranger.key)
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)
    assert other.batches.list().data == []

    assert client.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)
    assert client.batches.retrieve(batch.id).input_file_id == upload.id  # a batch keeps naming its input


def test_a_malformed_file_fails_the_batch_naming_each_line(stack):
    client = sdk(stack)
    lines = [
        request_line("ok", "fine"),
        "{not json",
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},
        request_line("ok", "again"),
        {**request_line("get", "x"), "method": "GET"},
        request_line("nomodel", "x", model="gpt-9"),
        request_line("bad-body", "x", temperature=9),
    ]
    upload = client.files.create(file=("bad.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_for(client, batch.id)
    assert done.status == "failed" and done.failed_at
    got = [(e.line, e.code) for e in done.errors.data]
    assert got == [
        (2, "invalid_json_line"),
        (3, "missing_required_parameter"),
        (4, "duplicate_custom_id"),
        (5, "invalid_method"),
        (6, "model_not_found"),
        (7, "invalid_request"),
    ]
    assert done.errors.data[-1].param == "temperature"
    assert not Job.objects.filter(batch_id=batch.id).exists()  # nothing ran

    with pytest.raises(openai.BadRequestError) as wrong:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    assert wrong.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as missing:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    assert missing.value.body["code"] == "file_not_found"
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert purpose.value.body["param"] == "purpose"


def test_cancel_mid_way_keeps_the_finished_lines(gunicorn_server, worker_process, user, monkeypatch, redis_db):
    monkeypatch.setenv("BATCH_WINDOW", "4")  # most lines are held by the window when the cancel comes
    stack = start_stack(gunicorn_server, worker_process, user, token_ms=100, MAX_CONCURRENCY="2")
    client = sdk(stack)
    lines = [request_line(f"r{i:02d}", "one two three four five") for i in range(20)]  # 0.5 s each, 2 at a time
    upload = client.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 20
    while not Job.objects.filter(batch_id=batch.id, state=JobState.SUCCEEDED).exists():
        assert time.monotonic() < deadline, "no line finished"
        time.sleep(0.1)
    assert held_and_pushed(batch.id)[0] >= 5
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_for(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    counts = done.request_counts
    assert (
        counts.total == 20 and counts.completed >= 1 and counts.failed >= 10 and counts.completed + counts.failed == 20
    )
    assert len(lines_of(client, done.output_file_id)) == counts.completed
    errors = lines_of(client, done.error_file_id)
    assert {e["error"]["code"] for e in errors.values()} == {"batch_cancelled"}
    assert held_and_pushed(batch.id) == (0, 0) and not Job.objects.filter(batch_id=batch.id, state="queued").exists()
    assert int(redis_db.get(fair_queue.batch_depth_key("low")) or 0) == 0  # nothing of it left waiting

    bad = client.files.create(file=("bad.jsonl", b"{nope\n"), purpose="batch")
    failed = client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_for(client, failed.id).status == "failed"
    with pytest.raises(openai.ConflictError):  # a finished batch cannot be cancelled
        client.batches.cancel(failed.id)


def test_lines_left_when_the_window_passes_expire_and_the_batch_ends_expired(
    gunicorn_server, worker_process, user, monkeypatch
):
    monkeypatch.setenv("BATCH_COMPLETION_WINDOW_S", "3")
    monkeypatch.setenv("BATCH_WINDOW", "3")  # the lines left when the window passes are mostly held
    stack = start_stack(gunicorn_server, worker_process, user, token_ms=200, MAX_CONCURRENCY="1")
    client = sdk(stack)
    lines = [request_line(f"r{i:02d}", "one two three four five") for i in range(12)]  # 1 s each, one at a time
    upload = client.files.create(file=("window.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.expires_at - batch.created_at == 3
    deadline = time.monotonic() + 10
    while not Job.objects.filter(batch_id=batch.id, state=JobState.RUNNING).exists():
        assert time.monotonic() < deadline, "no line started"
        time.sleep(0.05)
    assert held_and_pushed(batch.id)[0] >= 6
    done = wait_for(client, batch.id)
    assert done.status == "expired" and done.expired_at
    counts = done.request_counts
    assert 1 <= counts.completed < 12 and counts.completed + counts.failed == 12
    assert len(lines_of(client, done.output_file_id)) == counts.completed
    errors = lines_of(client, done.error_file_id)
    assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}
    assert held_and_pushed(batch.id) == (0, 0)  # held lines expired too: none is left waiting


def test_tenant_limits_apply_to_the_batch_not_its_lines_rpm(stack):
    tenant = Tenant.objects.create(name="acme", rpm_limit=1, tokens_per_day=100, max_priority="normal")
    _, key = ApiKey.issue(tenant, "ci")
    client = sdk(stack, key=key)
    few = client.files.create(
        file=("few.jsonl", jsonl([request_line(f"r{i}", "x", max_tokens=10) for i in range(5)])), purpose="batch"
    )
    ok = wait_for(
        client, client.batches.create(input_file_id=few.id, endpoint="/v1/chat/completions", completion_window="24h").id
    )
    assert ok.status == "completed" and ok.request_counts.completed == 5  # 5 lines in a minute: rpm_limit 1 not applied
    assert set(Job.objects.filter(batch_id=ok.id).values_list("tenant_id", flat=True)) == {tenant.pk}

    many = client.files.create(
        file=("many.jsonl", jsonl([request_line(f"r{i}", "x", max_tokens=30) for i in range(5)])), purpose="batch"
    )
    over = wait_for(
        client,
        client.batches.create(input_file_id=many.id, endpoint="/v1/chat/completions", completion_window="24h").id,
    )
    assert over.status == "failed" and over.errors.data[0].code == "token_limit_exceeded"

    with pytest.raises(openai.PermissionDeniedError) as high:
        client.batches.create(
            input_file_id=few.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_body={"priority": "high"},
        )
    assert high.value.body["code"] == "max_priority"


def held_and_pushed(batch_id: str) -> tuple[int, int]:
    """(lines its window holds back, lines on the queue or running)."""
    lines = Job.objects.filter(batch_id=batch_id)
    held = lines.filter(state=JobState.QUEUED, enqueued_at__isnull=True).count()
    pushed = lines.filter(state__in=[JobState.QUEUED, JobState.RUNNING], enqueued_at__isnull=False).count()
    return held, pushed


def test_a_batch_backlog_neither_refuses_nor_delays_the_tenants_interactive_jobs(
    gunicorn_server, worker_process, user, monkeypatch, redis_db
):
    monkeypatch.setenv("BATCH_WINDOW", "4")
    monkeypatch.setenv("QUEUE_MAX_DEPTH", "5")
    stack = start_stack(gunicorn_server, worker_process, user, token_ms=30, MAX_CONCURRENCY="1")
    tenant = Tenant.objects.create(name="acme", max_queued=5)
    _, key = ApiKey.issue(tenant, "ci")
    client, headers = sdk(stack, key=key), {"Authorization": f"Bearer {key}"}
    lines = [request_line(f"r{i:02d}", "one two three four five") for i in range(40)]  # ~0.15 s each, one at a time
    upload = client.files.create(file=("many.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 20
    while not Job.objects.filter(batch_id=batch.id, state=JobState.SUCCEEDED).exists():
        assert time.monotonic() < deadline, "no line finished"
        time.sleep(0.05)
    held, pushed = held_and_pushed(batch.id)
    assert held >= 25 and 1 <= pushed <= 4  # the window: Redis holds four lines, not forty
    assert redis_db.zcard(f"{fair_queue.PREFIX}q:low:t:{tenant.pk}") <= 4

    # 30-odd lines wait, over max_queued (5) and QUEUE_MAX_DEPTH (5): the tenant's own requests are admitted
    urgent = httpx.post(f"{stack['base']}/jobs", json={"prompt": "urgent", "priority": "normal"}, headers=headers)
    submitted = time.time()
    same = httpx.post(f"{stack['base']}/jobs", json={"prompt": "same level", "priority": "low"}, headers=headers)
    assert urgent.status_code == 202 and same.status_code == 202, (urgent.text, same.text)
    completion = httpx.post(
        f"{stack['base']}/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
        timeout=30,
    )
    assert completion.status_code == 200, completion.text

    last = Job.objects.filter(batch_id=batch.id, state=JobState.QUEUED).order_by("custom_id").last()
    ahead = Job.objects.filter(batch_id=batch.id, state=JobState.QUEUED, custom_id__lt=last.custom_id).count()
    place = httpx.get(f"{stack['base']}/jobs/{last.pk}", headers=headers).json()
    assert place["state"] == "queued" and place["queue_position"] >= ahead  # held, yet it has a place

    done = wait_for(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 40, done
    assert sorted(lines_of(client, done.output_file_id)) == [f"r{i:02d}" for i in range(40)]
    first, level = Job.objects.get(pk=urgent.json()["id"]), Job.objects.get(pk=same.json()["id"])
    assert first.state == level.state == JobState.SUCCEEDED
    lines_after = Job.objects.filter(batch_id=batch.id, started_at__gt=first.started_at).count()
    assert lines_after >= 20  # `normal` went before the batch's `low` lines still waiting
    # at the batch's own priority the tenant's job waited behind the window (and a refill while it was
    # being submitted) only, not behind the backlog
    overtook = Job.objects.filter(
        batch_id=batch.id, started_at__gt=datetime.fromtimestamp(submitted, UTC), started_at__lt=level.started_at
    ).count()
    assert overtook <= 4 + 1 and Job.objects.filter(batch_id=batch.id, started_at__gt=level.started_at).count() >= 20
    for name in ("queued", "batched"):
        assert int(redis_db.get(f"{fair_queue.PREFIX}tenant:{tenant.pk}:{name}") or 0) == 0


@override_settings(FILES_MAX_BYTES=2048)
def test_a_file_over_the_limit_is_a_413(user, db):
    api = token_client(user)
    big = b'{"custom_id": "x"}\n' * 200
    response = api.post(
        "/v1/files", {"purpose": "batch", "file": SimpleUploadedFile("big.jsonl", big)}, format="multipart"
    )
    assert response.status_code == 413
    assert (
        response.json()["error"]["code"] == "file_too_large"
        and "FILES_MAX_BYTES" in response.json()["error"]["message"]
    )
    assert not Batch.objects.exists()
