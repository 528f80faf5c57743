"""A streaming job's deltas: published by the worker as they come, read back in order, reset and ended."""

from __future__ import annotations

import threading
import time

import pytest

from jobs import deltas
from jobs.models import Job, JobState
from orchestrator_site.redis import redis_client
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.factories import make_job
from tests.fakes.openai_server import OpenAIFake
from workers.execution.job_run import DirectWriter, RunContext, run_claimed

pytestmark = pytest.mark.django_db(transaction=True)
WORDS = "alpha beta gamma delta epsilon zeta eta theta"


def dev(name: str = "dev-stream", **config) -> Backend:
    return Backend.objects.create(name=name, kind=BackendKind.DEV, config=config)


def start(job: Job, ctx: RunContext | None = None) -> threading.Thread:
    """Run ``job`` as a worker's job thread would, in a thread of this process."""
    assert job.mark_running("test-worker")
    thread = threading.Thread(target=run_claimed, args=(job, ctx or RunContext("test-worker")), daemon=True)
    thread.start()
    return thread


def text_of(events: list[tuple[str, dict]]) -> str:
    return "".join(e.get("content", "") for _, e in events if e["type"] == "delta")


# --- the stream itself ---------------------------------------------------------------------------
def test_published_events_read_back_in_order_after_any_id():
    ids = deltas.publish("j1", [{"type": "delta", "content": str(i)} for i in range(5)])
    events = deltas.read("j1")
    assert [i for i, _ in events] == ids and [e["content"] for _, e in events] == list("01234")
    assert [e["content"] for _, e in deltas.read("j1", after_id=ids[2])] == ["3", "4"]  # Last-Event-ID resume
    assert deltas.read("j1", after_id=ids[-1]) == [] and deltas.read("nobody") == []


def test_stream_is_capped_and_expires(settings):
    settings.STREAM_MAX_EVENTS, settings.STREAM_TTL_S = 20, 60
    deltas.publish("j1", [{"type": "delta", "content": "x"} for _ in range(3000)])
    r = redis_client()
    assert r.xlen(deltas.stream_key("j1")) < 300  # approximate trimming: whole nodes go
    assert 0 < r.ttl(deltas.stream_key("j1")) <= 60


def test_a_blocking_read_wakes_when_an_event_arrives():
    timer = threading.Timer(0.2, deltas.publish, args=("j1", [{"type": "end", "state": "succeeded"}]))
    timer.start()
    started = time.monotonic()
    events = deltas.read("j1", block_ms=5000)
    assert events and events[0][1]["type"] == "end" and time.monotonic() - started < 3


def test_fast_deltas_are_merged_into_few_writes_with_the_same_text():
    stream = deltas.JobStream("j1")
    pieces = [f" w{i}" for i in range(2000)]
    for piece in pieces:
        stream({"content": piece})
    stream.end("succeeded", "stop", {"prompt_tokens": 1, "completion_tokens": 2000})
    assert deltas.drain()
    events = deltas.read("j1")
    assert text_of(events) == "".join(pieces)
    assert len(events) < 2000 / 10  # batched: nowhere near one entry per token
    assert events[-1][1] == {
        "type": "end",
        "state": "succeeded",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2000},
        "error": None,
    }


def test_tool_call_argument_fragments_merge_per_call():
    stream = deltas.JobStream("j1")
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    stream({"tool_calls": [first]})
    for part in ['{"a"', ": 1", "}"]:
        stream({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
    assert deltas.drain()
    calls = [c for _, e in deltas.read("j1") for c in e.get("tool_calls", [])]
    assert calls[0]["id"] == "call_1" and calls[0]["function"]["name"] == "f"
    assert "".join(c["function"].get("arguments", "") for c in calls) == '{"a": 1}'


def test_a_run_of_a_job_that_ran_before_starts_the_stream_afresh():
    deltas.publish("j1", [{"type": "delta", "content": "old"}, {"type": "end", "state": "failed"}])
    stream = deltas.JobStream("j1", attempt=2)  # e.g. an operator's retry, or a lost worker's job
    stream.begin_attempt(2)
    stream({"content": "new"})
    assert deltas.drain()
    assert [e for _, e in deltas.read("j1")] == [{"type": "reset", "attempt": 2}, {"type": "delta", "content": "new"}]


# --- through a worker's run --------------------------------------------------------------------
def test_a_streaming_job_publishes_its_words_before_it_ends_then_an_end_event():
    job = make_job(dev(token_ms=60), prompt=WORDS, stream=True)
    thread = start(job)
    first = deltas.read(job.pk, block_ms=5000)
    assert first and first[0][1] == {"type": "delta", "content": "alpha"}
    assert Job.objects.get(pk=job.pk).state == JobState.RUNNING  # the first word came before the end
    events = first + list(deltas.follow(job.pk, after_id=first[-1][0], block_ms=5000))
    thread.join(10)
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and text_of(events) == job.output == WORDS
    end = events[-1][1]
    assert end == {
        "type": "end",
        "state": "succeeded",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 8, "completion_tokens": 8},
        "error": None,
    }
    ids = [i for i, _ in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)


def test_every_delta_is_in_the_stream_before_the_success_is_committed(settings):
    """A relay ends when the status turns terminal: deltas still buffered then would never reach it."""
    settings.STREAM_FLUSH_S = 30  # after the first word, nothing would go out before the commit unflushed

    class Seeing(DirectWriter):
        seen: str | None = None

        def run_batched(self, fn, item, *, then=None):
            self.seen = text_of(deltas.read(item[0].pk))  # what a relay reads once the success is visible
            return super().run_batched(fn, item, then=then)

    writer = Seeing()
    job = make_job(dev(token_ms=0), prompt=WORDS, stream=True)
    start(job, RunContext("test-worker", writer)).join(10)
    assert Job.objects.get(pk=job.pk).state == JobState.SUCCEEDED
    assert writer.seen == WORDS


def test_a_job_that_does_not_stream_publishes_nothing():
    job = make_job(dev(), prompt=WORDS)
    start(job).join(10)
    assert Job.objects.get(pk=job.pk).state == JobState.SUCCEEDED
    assert not redis_client().exists(deltas.stream_key(job.pk))


def test_a_retry_after_output_publishes_a_reset_then_the_new_attempt_and_the_failure():
    seen: list[dict] = []
    with OpenAIFake(error_after=2, reply="one two three", chunk_delay_s=0.05) as fake:
        backend = Backend.objects.create(
            name="oa",
            kind=BackendKind.OPENAI,
            base_url=fake.base_url,
            model="gpt-test",
            config={"retry_max": 1, "retry_base_ms": 1, "retry_cap_ms": 1},
        )
        job = make_job(backend, prompt="x", stream=True)
        reader = threading.Thread(target=lambda: seen.extend(e for _, e in deltas.follow(job.pk, block_ms=10_000)))
        reader.start()  # a reader waiting before the job starts sees every attempt
        start(job).join(20)
        reader.join(20)
    job.refresh_from_db()
    assert job.state == JobState.FAILED and job.attempt_count == 2
    assert text_of([("", e) for e in seen[: seen.index({"type": "reset", "attempt": 2})]]) == "one two"
    after = seen[seen.index({"type": "reset", "attempt": 2}) + 1 :]
    assert text_of([("", e) for e in after]) == "one two"
    assert after[-1]["type"] == "end" and after[-1]["state"] == "failed" and after[-1]["error"] == job.error
    # What was void is gone: a reader starting now sees the reset first.
    stored = [e for _, e in deltas.read(job.pk)]
    assert stored[0] == {"type": "reset", "attempt": 2} and stored[1:] == after


def test_a_job_canceled_while_streaming_ends_its_stream_as_canceled():
    job = make_job(dev(token_ms=100), prompt=WORDS, stream=True)
    ctx = RunContext("test-worker")
    thread = start(job, ctx)
    assert deltas.read(job.pk, block_ms=5000)
    assert Job.objects.get(pk=job.pk).cancel()
    ctx.cancel.set()  # what the worker's watcher does for a canceled job
    thread.join(10)
    events = list(deltas.follow(job.pk, block_ms=3000, on_idle=lambda: False))
    assert events[-1][1]["type"] == "end" and events[-1][1]["state"] == "canceled"
    assert len(text_of(events).split()) < len(WORDS.split())


def test_a_worker_process_streams_a_job_submitted_through_the_api(api, worker_process):
    backend = dev("dev-proc", token_ms=50)
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": [backend.name]}))
    r = api.post("/jobs", {"prompt": WORDS}, format="json")
    assert r.status_code == 202, r.content
    job_id = r.json()["id"]
    Job.objects.filter(pk=job_id).update(stream=True)  # before any worker runs
    worker_process()
    events = list(deltas.follow(job_id, block_ms=20_000, on_idle=lambda: False))
    assert text_of(events) == WORDS and events[-1][1]["state"] == "succeeded"
    assert api.get(f"/jobs/{job_id}/result").json()["output"] == WORDS
