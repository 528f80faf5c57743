"""A job canceled while Ollama streams its answer closes the stream: Ollama stops generating when its
client goes away, so the GPU behind it is free for the next request. The fake sees the disconnect."""

from __future__ import annotations

import threading
import time

import pytest

from jobs.models import AttemptOutcome, Job, JobState
from orchestrator_site.redis import redis_client
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.factories import ask
from tests.fakes.ollama_server import OllamaFake
from workers.backends.base import BackendConfig, JobCanceled
from workers.backends.ollama import OllamaAdapter

LONG_REPLY = " ".join(f"w{i}" for i in range(1200))  # 60 s at the pace below: the cancel comes first
PACE_S = 0.05


def poll(what: str, check, timeout: float = 30, log=None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}" + (f"\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.02)


def test_a_cancel_mid_stream_closes_the_stream_and_the_server_sees_the_client_go():
    with OllamaFake(reply=LONG_REPLY, chunk_delay_s=PACE_S) as fake:
        request = ask()

        def cancel_once_streaming() -> None:
            poll("the chat request arrived", lambda: fake.requests_to("/api/chat"))
            request.cancel.set()

        threading.Thread(target=cancel_once_streaming, daemon=True).start()
        backend = BackendConfig(name="ol", kind="ollama", base_url=fake.url, model="llama3.2", timeout_s=120.0)
        with pytest.raises(JobCanceled):
            OllamaAdapter().generate(backend, request)
        poll("the server saw the client go", lambda: fake.clients_gone)
        assert fake.clients_gone == 1


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_canceling_a_running_ollama_job_closes_its_stream_and_frees_the_slot(api, worker_process):
    with OllamaFake(reply=LONG_REPLY, chunk_delay_s=PACE_S) as fake:
        Backend.objects.create(name="ollama", kind=BackendKind.OLLAMA, base_url=fake.url, model="llama3.2")
        policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["ollama"]}))
        long_id = api.post("/jobs", {"prompt": "long"}, format="json").json()["id"]
        worker = worker_process(MAX_CONCURRENCY="1", WORKER_HEARTBEAT_MS="300")
        poll(
            "the job is streaming",
            lambda: Job.objects.get(pk=long_id).state == JobState.RUNNING and fake.requests_to("/api/chat"),
            log=worker.log_path,
        )
        assert api.post(f"/jobs/{long_id}/cancel").json()["state"] == JobState.CANCELED
        poll("the server saw the worker close the stream", lambda: fake.clients_gone, log=worker.log_path)
        fake.reply = "short answer"
        next_id = api.post("/jobs", {"prompt": "next"}, format="json").json()["id"]
        # The worker's one slot was held by the long call: the next job runs only once that call stopped.
        poll(
            "the next job ran in the freed slot",
            lambda: Job.objects.get(pk=next_id).state == JobState.SUCCEEDED,
            log=worker.log_path,
        )
    job = Job.objects.get(pk=long_id)
    assert job.state == JobState.CANCELED and job.output == ""
    assert job.attempts.get().outcome == AttemptOutcome.CANCELED
    assert fake.clients_gone == 1
    assert redis_client().zcard("llmo:inflight:ollama") == 0
