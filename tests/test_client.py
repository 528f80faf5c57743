"""The Python client (client/llmo) against a live server: gunicorn with uvicorn workers, a real RQ worker,
Redis and the test database (tests/live_stack.py). The batch tests need /v1/files and /v1/batches
(marker ``needs_batches``)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime

import httpx
import llmo
import pytest

from jobs.models import Job, JobState
from tenants import admission, identity
from tenants.models import Membership, Tenant
from tests import live_stack
from tests.live_stack import Recorder, slow_prompt


@pytest.fixture
def stack(gunicorn_server, worker_process, user) -> dict:
    return live_stack.start(gunicorn_server, worker_process, user)


def client(stack: dict, **kwargs) -> llmo.Client:
    return llmo.Client(stack["base"], token=stack["token"], timeout=30, **kwargs)


def test_submit_wait_result_get_round_trip_with_typed_documents(stack):
    rec = Recorder()
    with client(stack, transport=rec) as api:
        job = api.submit("hello there", priority="high", max_tokens=50, metadata={"ticket": 42})
        assert isinstance(job, llmo.Job) and job.state == "queued" and job.priority == "high"
        assert job.backend == "dev" and job.metadata == {"ticket": 42} and not job.replayed
        assert isinstance(job.created_at, datetime) and job.created_at.tzinfo is not None
        assert job.links["result"] == f"/jobs/{job.id}/result"

        result = api.wait(job.id, timeout=30)
        assert isinstance(result, llmo.JobResult) and result.succeeded and result.final
        assert result.output == "hello there" and result.usage == {"prompt_tokens": 2, "completion_tokens": 2}
        assert api.result(job.id) == result

        done = api.get(job.id)
        assert done.state == "succeeded" and done.final and done.attempts == 1 and done.finished_at is not None
        (attempt,) = done.attempt_log
        assert isinstance(attempt, llmo.Attempt) and attempt.outcome == "succeeded" and attempt.backend == "dev"

        # A job of ~3 s is waited for with long polls (?wait=), not a poll loop.
        slow = api.submit(slow_prompt(3))
        started = time.monotonic()
        assert api.wait(slow.id, timeout=30).succeeded
        assert time.monotonic() - started > 2
    polls = rec.to("GET", f"/jobs/{slow.id}/result")
    assert 1 <= len(polls) <= 2 and all(float(c["query"]["wait"]) > 1 for c in polls)
    sent = rec.to("POST", "/jobs")
    keys = {c["headers"]["idempotency-key"] for c in sent}
    assert len(keys) == 2 and all(uuid.UUID(k).version == 4 for k in keys)  # one new UUID per submission
    assert all(c["headers"]["authorization"] == f"Bearer {stack['token']}" for c in rec.calls)


def test_wait_by_polling_sleeps_the_servers_retry_after_and_times_out_with_the_state(stack):
    rec = Recorder()
    with client(stack, transport=rec, long_poll=False) as api:
        job = api.submit(slow_prompt(2.5))
        assert api.wait(job.id, timeout=30).succeeded
        polls = [c["at"] for c in rec.to("GET", f"/jobs/{job.id}/result")]
        # As many polls as the job's time allows (a busy machine starts it later), never closer than Retry-After.
        assert len(polls) >= 2 and all("wait" not in c["query"] for c in rec.to("GET", f"/jobs/{job.id}/result"))
        gaps = [b - a for a, b in zip(polls, polls[1:], strict=False)]
        assert min(gaps) >= 0.9  # Retry-After: 1

        long = api.submit(slow_prompt(20))
        with pytest.raises(llmo.WaitTimeout) as late:
            api.wait(long.id, timeout=1.5)
        assert late.value.id == long.id and late.value.state in ("queued", "running")
        assert isinstance(late.value, TimeoutError)
        api.cancel(long.id)


def test_a_retry_after_a_lost_answer_reuses_the_key_and_gets_the_same_job(stack):
    # The first POST reaches the server and creates the job; its answer is lost on the way back.
    lost = []

    def lose_first_answer(request: httpx.Request, response: httpx.Response) -> bool:
        if request.method == "POST" and request.url.path == "/jobs" and not lost:
            lost.append(response.status_code)
            return True
        return False

    rec = Recorder(fail=lose_first_answer)
    with client(stack, transport=rec) as api:
        job = api.submit("only once")
    assert lost == [202]
    posts = rec.to("POST", "/jobs")
    assert len(posts) == 2 and posts[0]["headers"]["idempotency-key"] == posts[1]["headers"]["idempotency-key"]
    assert job.replayed and Job.objects.count() == 1 and str(Job.objects.get().pk) == job.id

    with client(stack) as api:  # a key of the caller's own: the same key is the same job
        first = api.submit("mine", idempotency_key="invoice-42")
        again = api.submit("mine", idempotency_key="invoice-42")
        assert again.id == first.id and again.replayed and not first.replayed
        with pytest.raises(llmo.Unprocessable) as other_body:
            api.submit("another body", idempotency_key="invoice-42")
        assert other_body.value.status == 422 and "Idempotency-Key" in other_body.value.fields
    assert Job.objects.count() == 2


def test_cancel_and_a_second_cancel_is_a_typed_conflict(stack):
    with client(stack) as api:
        job = api.submit(slow_prompt(30))
        canceled = api.cancel(job.id)
        assert canceled.state == "canceled"
        with pytest.raises(llmo.Conflict) as again:
            api.cancel(job.id)
        assert again.value.status == 409 and "canceled" in again.value.message
        assert api.wait(job.id, timeout=10).state == "canceled"
    assert Job.objects.get(pk=job.id).state == JobState.CANCELED


def test_stream_yields_typed_events_resumes_after_a_drop_and_ends_with_the_result(stack):
    with client(stack) as api:
        job = api.submit("a b c d e f", stream=True)
        events = list(api.stream(job.id))
        assert all(isinstance(e, llmo.StreamEvent) for e in events)
        assert "".join(e.content for e in events) == "a b c d e f"
        assert events[-1].event == "end" and events[-1].result.output == "a b c d e f"
        assert all(e.id for e in events if e.event == "delta")
        rest = list(api.stream(job.id, after=events[1].id))
        assert "".join(e.content for e in rest) == " c d e f"

    rec = Recorder(break_first_stream_after=2)  # the connection breaks after two events
    with client(stack, transport=rec) as api:
        job = api.submit("one two three four five six", stream=True)
        events = list(api.stream(job.id))
    assert "".join(e.content for e in events) == "one two three four five six"  # each word once
    assert events[-1].result.succeeded
    opens = rec.to("GET", f"/jobs/{job.id}/stream")
    assert len(opens) == 2 and "last-event-id" not in opens[0]["headers"]
    assert opens[1]["headers"]["last-event-id"] in {e.id for e in events[:-1]}


def test_jobs_lists_every_page_and_filters(stack):
    rec = Recorder()
    with client(stack, transport=rec) as api:
        ids = [api.submit(f"job {i}", priority="low" if i % 2 else "normal").id for i in range(5)]
        failed = api.submit("x", backend="broken")
        for job_id in [*ids, failed.id]:
            api.wait(job_id, timeout=30)
        assert api.result(failed.id).state == "failed" and api.result(failed.id).error

        listed = list(api.jobs(page_size=2))
        assert [j.id for j in listed] == [failed.id, *reversed(ids)]  # newest first, across pages
        assert len(rec.to("GET", "/jobs")) == 3
        assert [j.id for j in api.jobs(limit=3)] == [failed.id, ids[4], ids[3]]
        assert [j.id for j in api.jobs(state="failed")] == [failed.id]
        assert {j.id for j in api.jobs(priority="low")} == {ids[1], ids[3]}
        page = api.jobs_page(page_size=4)
        assert len(page.items) == 4 and page.next_cursor
        assert len(api.jobs_page(page_size=4, cursor=page.next_cursor).items) == 2
        with pytest.raises(llmo.BadRequest) as bad:
            list(api.jobs(state="lost"))
        assert "state" in bad.value.fields and "queued" in bad.value.message


def test_api_errors_are_typed(stack):
    with client(stack) as api:
        with pytest.raises(llmo.BadRequest) as bad:
            api.submit("x", max_tokens=0)
        assert bad.value.status == 400 and bad.value.code == "invalid_request"
        assert "max_tokens" in bad.value.fields and "max_tokens" in bad.value.message
        with pytest.raises(llmo.BadRequest) as both:
            api.submit("x", messages=[{"role": "user", "content": "y"}])
        assert "prompt" in both.value.fields
        with pytest.raises(llmo.NotFound) as missing:
            api.get(str(uuid.uuid4()))
        assert missing.value.status == 404 and missing.value.code == "not_found"
        with pytest.raises(llmo.NotFound):
            api.result("not-a-uuid/../../jobs")  # one path segment, whatever it holds
    with llmo.Client(stack["base"], token="wrong", max_retries=0) as stranger:
        with pytest.raises(llmo.Unauthorized) as unauthorized:
            stranger.get(str(uuid.uuid4()))
        assert unauthorized.value.status == 401 and isinstance(unauthorized.value, llmo.ApiError)
    with llmo.Client("http://127.0.0.1:9", token="t", max_retries=1) as nowhere, pytest.raises(llmo.TransportError):
        nowhere.get(str(uuid.uuid4()))
    assert Job.objects.count() == 0


def test_rate_limited_is_typed_and_a_retry_honours_retry_after(stack, user, redis_db):
    tenant = Tenant.objects.create(name="acme", rpm_limit=1)
    Membership.objects.create(user=user, tenant=tenant)
    identity.forget()
    rec = Recorder()
    with client(stack, transport=rec) as api:
        api.submit("first")
        with pytest.raises(llmo.RateLimited) as limited:
            api.submit("second")
        err = limited.value
        assert err.status == 429 and err.code == "rpm_limit" and 55 <= err.retry_after <= 60
        # Move the minute on: the first submission now leaves it in about 2 s.
        key = f"{admission.PREFIX}t:{tenant.pk}:rpm"
        ((member, _),) = redis_db.zrange(key, 0, -1, withscores=True)
        redis_db.zadd(key, {member: time.time() * 1000 - 58_500})
        started = time.monotonic()
        second = api.submit("second", rate_limit_wait=10)
        waited = time.monotonic() - started
    tries = rec.to("POST", "/jobs")[2:]
    assert len(tries) == 2 and tries[0]["headers"]["idempotency-key"] == tries[1]["headers"]["idempotency-key"]
    assert tries[1]["at"] - tries[0]["at"] >= 1.0  # slept the Retry-After (1 or 2 s) before sending again
    assert waited < 8 and second.state == "queued" and Job.objects.count() == 2


def test_async_client_submits_waits_streams_and_lists(stack):
    async def scenario() -> tuple:
        async with llmo.AsyncClient(stack["base"], token=stack["token"]) as api:
            job = await api.submit("async hello", stream=True)
            events = [e async for e in api.stream(job.id)]
            result = await api.wait(job.id, timeout=30)
            listed = [j.id async for j in api.jobs(limit=5)]
            with pytest.raises(llmo.NotFound):
                await api.get(str(uuid.uuid4()))
            return job, events, result, listed

    job, events, result, listed = asyncio.run(scenario())
    assert "".join(e.content for e in events) == "async hello" and events[-1].event == "end"
    assert result.output == "async hello" and listed == [job.id]


# --- batches: /v1/files and /v1/batches (OpenAI's Batch API) ----------------------------------------
def _requests_jsonl(*lines: tuple[str, str]) -> bytes:
    return "".join(
        json.dumps(
            {
                "custom_id": custom_id,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": f"say {custom_id}"}]},
            }
        )
        + "\n"
        for custom_id, model in lines
    ).encode()


@pytest.mark.needs_batches
def test_batch_upload_create_wait_and_read_output_and_error_files(stack):
    with client(stack) as api:
        uploaded = api.files_upload(_requests_jsonl(("a", "dev"), ("b", "dev"), ("c", "broken")), filename="in.jsonl")
        assert isinstance(uploaded, llmo.FileObject) and uploaded.id and uploaded.purpose == "batch"
        batch = api.batch_create(uploaded.id, metadata={"run": "test"})
        assert isinstance(batch, llmo.Batch) and batch.input_file_id == uploaded.id
        assert batch.endpoint == "/v1/chat/completions" and batch.completion_window == "24h"
        done = api.batch_wait(batch.id, timeout=60, poll_interval=0.5)
        assert done.status == "completed" and done.final
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
        output = {line["custom_id"]: line for line in api.file_lines(done.output_file_id)}
        assert set(output) == {"a", "b"}
        assert output["a"]["response"]["status_code"] == 200
        assert output["a"]["response"]["body"]["choices"][0]["message"]["content"] == "say a"
        errors = [line["custom_id"] for line in api.file_lines(done.error_file_id)]
        assert errors == ["c"]
        assert api.batch_get(batch.id).status == "completed"
        assert batch.id in [b.id for b in api.batches(limit=10)]


@pytest.mark.needs_batches
def test_batch_cancel_and_a_malformed_file_names_its_line(stack):
    with client(stack) as api:
        slow = [(f"s{i}", "dev") for i in range(20)]
        body = b"".join(
            json.dumps(
                {
                    "custom_id": cid,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": model, "messages": [{"role": "user", "content": slow_prompt(3)}]},
                }
            ).encode()
            + b"\n"
            for cid, model in slow
        )
        batch = api.batch_submit(body)
        canceled = api.batch_cancel(batch.id)
        assert canceled.status in ("cancelling", "cancelled")
        assert api.batch_wait(batch.id, timeout=60, poll_interval=0.5).status == "cancelled"

        bad = api.files_upload(_requests_jsonl(("ok", "dev")) + b"{not json\n", filename="bad.jsonl")
        failed = api.batch_wait(api.batch_create(bad.id).id, timeout=30, poll_interval=0.5)
        assert failed.status == "failed" and any(e.line == 2 for e in failed.errors)
        with pytest.raises(llmo.NotFound):
            api.batch_get("batch_does_not_exist")
