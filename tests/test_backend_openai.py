"""The OpenAI-compatible adapter and probe against a real HTTP fake: request shape, results, error classes."""

from __future__ import annotations

import base64
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from jobs.models import Job, JobState
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import free_port, run_worker_burst
from tests.factories import ask, outputs_from_threads
from tests.fakes.openai_server import OpenAIFake
from workers.backends import get_adapter
from workers.backends.base import BackendConfig, BackendError, GenerationRequest, JobCanceled
from workers.backends.health import probe
from workers.backends.openai import OpenAIAdapter, sniff_image_type

PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
JPEG_HEAD = base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01").decode()
KEY = "sk-secret-key-0123456789"
# A server that takes this long to answer (the fakes wake at once when stopped): a call that stops
# well before it stopped by its deadline or cancel. How close to the deadline: bench/deadlines.py.
LONG_S = 60.0
LONG_REPLY = " ".join(f"w{i}" for i in range(int(LONG_S / 0.05)))  # LONG_S at 0.05 s per chunk


@pytest.fixture
def fake():
    with OpenAIFake(api_key=KEY) as server:
        yield server


def backend_for(fake: OpenAIFake, **kw) -> BackendConfig:
    defaults = {"name": "oa", "kind": "openai", "base_url": fake.base_url, "model": "gpt-test", "api_key": KEY}
    return BackendConfig(**{**defaults, "timeout_s": 10.0, **kw})


def fails(backend: BackendConfig, request: GenerationRequest | None = None) -> BackendError:
    with pytest.raises(BackendError) as err:
        OpenAIAdapter().generate(backend, request or ask())
    return err.value


# --- request shape -----------------------------------------------------------------------
def test_request_posts_chat_completions_with_bearer_model_messages_and_sampling(fake):
    backend = backend_for(fake, config={"params": {"top_p": 0.5, "seed": 1}})
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]
    params = {"top_p": 0.9, "stop": ["\n"], "model": "evil", "stream": True, "n": 3, "stream_options": {}}
    OpenAIAdapter().generate(backend, ask(messages=messages, max_tokens=50, temperature=0.2, params=params))
    (req,) = fake.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-type"] == "application/json"
    # config params < job params < the job's own fields; reserved names never come from params
    assert req.body == {
        "top_p": 0.9,
        "seed": 1,
        "stop": ["\n"],
        "model": "gpt-test",
        "messages": messages,
        "max_tokens": 50,
        "temperature": 0.2,
        "stream": True,  # ours, for cancel and the deadline between chunks; never the job's
        "stream_options": {"include_usage": True},
    }


def test_a_backend_can_turn_streaming_off(fake):
    result = OpenAIAdapter().generate(backend_for(fake, config={"stream": False}), ask())
    assert "stream" not in fake.last.body and "stream_options" not in fake.last.body
    assert (result.output, result.completion_tokens, result.finish_reason) == ("one two three", 3, "stop")


def test_no_authorization_header_without_a_key():
    with OpenAIFake() as fake:
        OpenAIAdapter().generate(backend_for(fake, api_key=""), ask(model="llava-test"))
        assert "authorization" not in fake.last.headers
        assert fake.last.body["model"] == "llava-test"


def test_max_tokens_param_and_num_predict_alias(fake):
    backend = backend_for(fake, config={"max_tokens_param": "max_completion_tokens"})
    OpenAIAdapter().generate(backend, ask(params={"num_predict": 7}))
    assert fake.last.body["max_completion_tokens"] == 7 and "max_tokens" not in fake.last.body
    OpenAIAdapter().generate(backend, ask(max_tokens=2, params={"num_predict": 7}))
    assert fake.last.body["max_completion_tokens"] == 2


def test_images_become_image_url_parts_on_the_last_user_message(fake):
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "what is this"},
    ]
    result = OpenAIAdapter().generate(
        backend_for(fake, model="llava-test"), ask(messages=messages, images=[PNG_1PX, JPEG_HEAD])
    )
    sent = fake.last.body["messages"]
    assert sent[:2] == messages[:2]
    assert sent[2] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_1PX}"}},
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG_HEAD}"}},
        ],
    }
    assert result.output == "what is this"


def test_images_without_a_user_message_get_one(fake):
    OpenAIAdapter().generate(backend_for(fake), ask(messages=[{"role": "system", "content": "x"}], images=[PNG_1PX]))
    last = fake.last.body["messages"][-1]
    assert last["role"] == "user" and last["content"][0] == {"type": "text", "text": ""}


@pytest.mark.parametrize(
    ("head", "mime"),
    [
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff\xdb", "image/jpeg"),
        (b"GIF89a", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"BM\x00\x00", "image/bmp"),
        (b"II*\x00", "image/tiff"),
    ],
)
def test_image_type_is_sniffed_from_the_bytes(head, mime):
    assert sniff_image_type(head) == mime


# --- results -----------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [True, False])
def test_result_has_output_usage_and_finish_reason(fake, stream):
    backend = backend_for(fake, config={"stream": stream})
    result = OpenAIAdapter().generate(backend, ask())
    assert (result.output, result.prompt_tokens, result.completion_tokens) == ("one two three", 3, 3)
    assert result.finish_reason == "stop"
    result = OpenAIAdapter().generate(backend, ask(max_tokens=1))
    assert (result.output, result.completion_tokens, result.finish_reason) == ("one", 1, "length")


def test_a_server_that_ignores_stream_is_read_as_one_answer(fake, monkeypatch):
    # Some servers answer a streamed request with one chat.completion object.
    monkeypatch.setattr(
        OpenAIFake,
        "_stream",
        lambda self, h, head, words, reason, usage, body, calls: h.send_json(
            200,
            {
                **head,
                "object": "chat.completion",
                "usage": usage,
                "choices": [{"index": 0, "message": {"content": " ".join(words)}, "finish_reason": reason}],
            },
        ),
    )
    result = OpenAIAdapter().generate(backend_for(fake), ask())
    assert (result.output, result.completion_tokens) == ("one two three", 3)


def test_cancel_mid_stream_stops_the_call_and_closes_the_servers_stream():
    with OpenAIFake(reply=LONG_REPLY, chunk_delay_s=0.05) as fake:
        request = ask()
        threading.Timer(0.3, request.cancel.set).start()
        t0 = time.monotonic()
        with pytest.raises(JobCanceled):
            OpenAIAdapter().generate(backend_for(fake, api_key=""), request)
        assert time.monotonic() - t0 < LONG_S / 2  # stopped by the cancel, not by the end of the answer
        deadline = time.monotonic() + 30
        while not fake.clients_gone and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.clients_gone == 1  # the server saw the client go: vLLM aborts the request then


def test_the_deadline_holds_between_chunks_of_a_slow_stream():
    with OpenAIFake(reply=LONG_REPLY, chunk_delay_s=0.05) as fake:
        t0 = time.monotonic()
        err = fails(backend_for(fake, api_key=""), ask(timeout_s=0.5))  # every read is quicker than 0.5 s
        assert time.monotonic() - t0 < LONG_S / 2  # the deadline, not the end of the answer
    assert err.retryable and "Timed out after 0.5s (streaming)" in err.message


def test_a_stream_cut_before_its_finish_reason_is_a_truncated_answer():
    with OpenAIFake(truncate_after=2) as fake:
        err = fails(backend_for(fake, api_key=""))
    assert err.retryable and "truncated" in err.message


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (400, False)])
def test_an_error_event_in_the_stream_is_classified_like_an_error_response(status, retryable):
    with OpenAIFake(error_after=1, fail_status=status, fail_message="engine died") as fake:
        err = fails(backend_for(fake, api_key=""))
    assert err.retryable is retryable and err.status == status and "engine died" in err.message


def test_one_pooled_client_per_base_url_shared_by_threads(fake):
    adapter = OpenAIAdapter()
    backend = backend_for(fake)
    assert outputs_from_threads(adapter, backend) == sorted(f"n {i}" for i in range(8))
    assert list(adapter._clients) == [fake.base_url]
    assert adapter.client(fake.base_url + "/") is adapter.client(fake.base_url)


def test_registry_serves_the_openai_adapter():
    assert isinstance(get_adapter("openai"), OpenAIAdapter)


# --- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["nested", "flat"])
def test_unknown_model_is_permanent_with_the_servers_message_in_both_shapes(style):
    with OpenAIFake(error_style=style) as fake:
        err = fails(backend_for(fake, model="nope"))
    assert (err.retryable, err.status) == (False, 404)
    assert err.message == "The model `nope` does not exist."


def test_bad_request_is_permanent(fake):
    err = fails(backend_for(fake), ask(messages=[]))
    assert (err.retryable, err.status) == (False, 400) and "messages" in err.message


def test_wrong_key_is_permanent_and_never_repeated(fake):
    wrong = "sk-wrong-key-987654321"
    err = fails(backend_for(fake, api_key=wrong))
    assert (err.retryable, err.status) == (False, 401)
    assert wrong not in str(err) and wrong not in err.message and "[redacted]" in err.message


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [(429, "7", 7.0), (503, "2.5", 2.5), (500, None, None), (429, None, None)],
)
def test_server_errors_are_retryable_and_carry_retry_after(status, retry_after, expected):
    with OpenAIFake(fail_first=1, fail_status=status, retry_after=retry_after) as fake:
        err = fails(backend_for(fake))
    assert (err.retryable, err.status) == (True, status)
    assert err.retry_after_s == expected


def test_retry_after_as_an_http_date():
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    with OpenAIFake(fail_first=1, fail_status=429, retry_after=when) as fake:
        err = fails(backend_for(fake))
    assert 25 <= err.retry_after_s <= 31


@pytest.mark.parametrize("style", ["nested", "flat"])
def test_rate_limit_in_both_shapes(style):
    with OpenAIFake(fail_first=1, fail_status=429, retry_after="1", error_style=style) as fake:
        err = fails(backend_for(fake))
    assert err.retryable and err.retry_after_s == 1.0 and err.message.startswith("Rate limit reached")


@pytest.mark.parametrize(
    ("knob", "stream"), [("empty_choices", False), ("omit_finish_reason", False), ("omit_finish_reason", True)]
)
def test_answer_without_choices_or_finish_reason_is_an_error(knob, stream):
    with OpenAIFake(**{knob: True}) as fake:
        err = fails(backend_for(fake, api_key="", config={"stream": stream}))
    assert err.retryable and err.status is None


@pytest.mark.parametrize("stream", [True, False])
def test_missing_usage_records_zero_tokens_not_an_error(stream):
    with OpenAIFake(omit_usage=True) as fake:
        result = OpenAIAdapter().generate(backend_for(fake, api_key="", config={"stream": stream}), ask())
    assert (result.output, result.prompt_tokens, result.completion_tokens) == ("one two three", 0, 0)


def test_connection_refused_is_retryable():
    err = fails(BackendConfig(name="x", kind="openai", base_url=f"http://127.0.0.1:{free_port()}/v1", model="m"))
    assert err.retryable and "Connection failed" in err.message


def test_request_timeout_is_the_calls_deadline():
    with OpenAIFake(latency_s=LONG_S) as fake:
        t0 = time.monotonic()
        err = fails(backend_for(fake), ask(timeout_s=0.3))
        assert time.monotonic() - t0 < LONG_S / 2  # the deadline, not the server's answer
    assert err.retryable and "Timed out after 0.3s" in err.message


def test_backend_timeout_caps_a_longer_job_timeout():
    with OpenAIFake(latency_s=LONG_S) as fake:
        t0 = time.monotonic()
        err = fails(backend_for(fake, timeout_s=0.3), ask(timeout_s=LONG_S * 2))
        assert time.monotonic() - t0 < LONG_S / 2 and err.retryable
    assert "Timed out after 0.3s" in err.message


# --- probes ------------------------------------------------------------------------------
def test_probe_lists_models_with_the_key(fake):
    result = probe(backend_for(fake))
    assert (result.ok, result.status, result.models) == (True, "ok", ["gpt-test", "llava-test"])
    assert fake.last.path == "/v1/models" and fake.last.headers["authorization"] == f"Bearer {KEY}"


def test_probe_with_a_wrong_key_is_an_error_without_the_key(fake):
    result = probe(backend_for(fake, api_key="sk-bad-000000"))
    assert (result.ok, result.status) == (False, "error") and "sk-bad-000000" not in result.detail


def test_probe_flags_a_model_that_is_not_served(fake):
    result = probe(backend_for(fake, model="other"))
    assert result.status == "error" and "not served" in result.detail


def test_probe_of_a_loading_llama_cpp_server_is_loading_not_down():
    with OpenAIFake(loading=True) as fake:
        result = probe(backend_for(fake))
        assert (result.ok, result.status) == (False, "loading") and "model is loading" in result.detail
        fake.loading = False
        assert probe(backend_for(fake, api_key="")).status == "ok"


def test_probe_falls_back_to_health_when_models_is_missing():
    with OpenAIFake() as fake:
        result = probe(backend_for(fake, base_url=f"{fake.url}/v2", api_key=""))  # /v2/models: 404
        assert result.status == "ok" and [r.path for r in fake.requests] == ["/v2/models", "/health"]


def test_probe_of_an_unreachable_server_is_down():
    result = probe(BackendConfig(name="x", kind="openai", base_url=f"http://127.0.0.1:{free_port()}/v1"), 1)
    assert (result.ok, result.status) == (False, "down")


# --- end to end --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_job_runs_on_an_openai_compatible_server_through_a_real_worker(api, fake):
    Backend.objects.create(
        name="vllm",
        kind=BackendKind.OPENAI,
        base_url=fake.base_url,
        model="llava-test",
        api_key=KEY,
        supports_multimodal=True,
        cost_input_per_1k="0.5",
        cost_output_per_1k="1.5",
    )
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["vllm"]}))
    body = {"messages": [{"role": "user", "content": "name these colours please"}], "images": [PNG_1PX]}
    r = api.post("/jobs", {**body, "temperature": 0.3, "params": {"seed": 5}}, format="json")
    assert r.status_code == 202, r.content
    run_worker_burst()
    job = Job.objects.get(pk=r.json()["id"])
    assert job.state == JobState.SUCCEEDED, job.error
    assert (job.output, job.finish_reason) == ("name these colours please", "stop")
    assert (job.prompt_tokens, job.completion_tokens) == (4, 4)
    assert float(job.cost) == pytest.approx((4 * 0.5 + 4 * 1.5) / 1000)
    sent = fake.last.body
    assert fake.last.headers["authorization"] == f"Bearer {KEY}"
    assert sent["temperature"] == 0.3 and sent["seed"] == 5
    assert sent["messages"][-1]["content"][1]["image_url"]["url"] == f"data:image/png;base64,{PNG_1PX}"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_canceling_a_running_job_stops_the_servers_generation_and_frees_the_slot(api, worker_process):
    with OpenAIFake(reply=LONG_REPLY, chunk_delay_s=0.05) as fake:
        Backend.objects.create(name="vllm", kind=BackendKind.OPENAI, base_url=fake.base_url, model="gpt-test")
        policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["vllm"]}))
        long_id = api.post("/jobs", {"prompt": "long"}, format="json").json()["id"]
        worker = worker_process(MAX_CONCURRENCY="1", WORKER_HEARTBEAT_MS="300")
        deadline = time.monotonic() + 30
        while Job.objects.get(pk=long_id).state != JobState.RUNNING or not fake.requests:
            assert time.monotonic() < deadline, worker.log_path.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(0.3)  # streaming
        assert api.post(f"/jobs/{long_id}/cancel").json()["state"] == JobState.CANCELED
        t0 = time.monotonic()
        while not fake.clients_gone:
            assert time.monotonic() - t0 < LONG_S / 2, "the worker kept the server generating"
            time.sleep(0.02)
        fake.reply = "short answer"
        next_id = api.post("/jobs", {"prompt": "next"}, format="json").json()["id"]
        while Job.objects.get(pk=next_id).state != JobState.SUCCEEDED:  # the one slot is free again
            assert time.monotonic() - t0 < LONG_S / 2, worker.log_path.read_text()[-3000:]
            time.sleep(0.05)
    job = Job.objects.get(pk=long_id)
    assert job.state == JobState.CANCELED and job.output == ""
    assert job.attempts.get().outcome == "canceled"


# --- deltas ---------------------------------------------------------------------------------------
def test_streamed_content_reaches_the_delta_sink_as_it_comes(fake):
    got: list[dict] = []
    result = OpenAIAdapter().generate(backend_for(fake), ask(on_delta=got.append))
    assert got == [{"content": "one"}, {"content": " two"}, {"content": " three"}]
    assert "".join(d["content"] for d in got) == result.output


def test_an_unstreamed_answer_reaches_the_delta_sink_whole(fake):
    got: list[dict] = []
    OpenAIAdapter().generate(backend_for(fake, config={"stream": False}), ask(on_delta=got.append))
    assert got == [{"content": "one two three"}]
