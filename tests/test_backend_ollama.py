"""The Ollama adapter and probe against a real HTTP Ollama fake: request shape, results, error classes."""

from __future__ import annotations

import base64
import time
from dataclasses import replace

import pytest

from jobs.models import Job, JobState
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import free_port, run_worker_burst
from tests.factories import ask, outputs_from_threads
from tests.fakes.ollama_server import OllamaFake
from workers.backends import get_adapter
from workers.backends.base import BackendConfig, BackendError, GenerationRequest
from workers.backends.health import probe, supports_multimodal
from workers.backends.ollama import OllamaAdapter

# A server that takes this long to answer (the fakes wake at once when stopped): a call that stops
# well before it stopped by its deadline. How close to the deadline: bench/deadlines.py.
LONG_S = 60.0
PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


@pytest.fixture
def fake():
    with OllamaFake() as server:
        yield server


def backend_for(fake: OllamaFake, **kw) -> BackendConfig:
    return BackendConfig(
        **{"name": "ol", "kind": "ollama", "base_url": fake.url, "model": "llama3.2", "timeout_s": 10.0, **kw}
    )


def fails(backend: BackendConfig, request: GenerationRequest) -> BackendError:
    with pytest.raises(BackendError) as err:
        OllamaAdapter().generate(backend, request)
    return err.value


# --- request shape -----------------------------------------------------------------------
def test_chat_request_carries_model_messages_options_and_keep_alive(fake):
    backend = backend_for(fake, config={"keep_alive": "10m", "options": {"num_ctx": 4096, "top_p": 0.5}})
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]
    params = {"top_p": 0.9, "seed": 7, "stop": ["\n"], "format": "json", "num_predict": 99, "model": "evil"}
    OllamaAdapter().generate(backend, ask(messages=messages, max_tokens=50, temperature=0.2, params=params))
    (req,) = fake.requests
    assert (req.method, req.path) == ("POST", "/api/chat")
    body = req.body
    assert body["model"] == "llama3.2" and body["stream"] is True
    assert body["messages"] == messages
    assert body["keep_alive"] == "10m" and body["format"] == "json"
    # config options < job params < the job's own max_tokens/temperature; params cannot replace the model
    assert body["options"] == {
        "num_ctx": 4096,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n"],
        "num_predict": 50,
        "model": "evil",
        "temperature": 0.2,
    }


def test_job_model_overrides_backend_model_and_max_tokens_alias(fake):
    OllamaAdapter().generate(backend_for(fake), ask(model="llava", params={"max_tokens": 2}))
    assert fake.last.body["model"] == "llava"
    assert fake.last.body["options"] == {"num_predict": 2}
    assert "keep_alive" not in fake.last.body


def test_images_ride_on_the_last_user_message_as_base64(fake):
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "what is this"},
    ]
    OllamaAdapter().generate(backend_for(fake, model="llava"), ask(messages=messages, images=[PNG_1PX, PNG_1PX]))
    sent = fake.last.body["messages"]
    assert sent[2]["images"] == [PNG_1PX, PNG_1PX]
    assert "images" not in sent[0] and "images" not in sent[1]


def test_images_without_a_user_message_get_one(fake):
    OllamaAdapter().generate(
        backend_for(fake, model="llava"), ask(messages=[{"role": "system", "content": "look"}], images=[PNG_1PX])
    )
    assert fake.last.body["messages"][-1] == {"role": "user", "images": [PNG_1PX]}  # the client drops empty content


def test_an_image_string_naming_a_file_is_sent_as_data_not_read_from_disk(fake, tmp_path, monkeypatch):
    """The client would upload a file whose path equals the string; we hand it bytes, never a str."""
    monkeypatch.chdir(tmp_path)
    name = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
    (tmp_path / name).write_bytes(b"SECRET FILE")
    OllamaAdapter().generate(backend_for(fake, model="llava"), ask(images=[name]))
    assert fake.last.body["messages"][-1]["images"] == [name]


def test_api_key_is_sent_as_bearer_when_set(fake):
    OllamaAdapter().generate(backend_for(fake, api_key="ol-key"), ask())
    assert fake.last.headers["authorization"] == "Bearer ol-key"
    OllamaAdapter().generate(backend_for(fake), ask())
    assert "authorization" not in fake.last.headers


# --- results -----------------------------------------------------------------------------
def test_result_has_streamed_output_usage_and_finish_reason(fake):
    result = OllamaAdapter().generate(backend_for(fake), ask())
    assert (result.output, result.prompt_tokens, result.completion_tokens) == ("one two three", 3, 3)
    assert result.finish_reason == "stop" and result.latency_ms >= 0
    assert result.timings == {
        "total_duration": 8.0,
        "load_duration": 1.0,
        "prompt_eval_duration": 2.0,
        "eval_duration": 3.0,
    }  # Ollama's nanoseconds, in ms
    result = OllamaAdapter().generate(backend_for(fake), ask(max_tokens=1))
    assert (result.output, result.completion_tokens, result.finish_reason) == ("one", 1, "length")


def test_one_client_per_backend_and_timeout_shared_by_threads(fake):
    adapter = OllamaAdapter()
    backend = backend_for(fake)
    assert outputs_from_threads(adapter, backend) == sorted(f"n {i}" for i in range(8))
    assert len(adapter._clients) == 1
    assert adapter.client(backend, 10.0) is adapter.client(backend, 10.0)
    assert adapter.client(backend, 5.0) is not adapter.client(backend, 10.0)


def test_registry_serves_the_ollama_adapter():
    assert isinstance(get_adapter("ollama"), OllamaAdapter)


# --- errors ------------------------------------------------------------------------------
def test_unknown_model_is_permanent_with_the_servers_message(fake):
    err = fails(backend_for(fake, model="nope"), ask())
    assert (err.retryable, err.status) == (False, 404)
    assert err.message == 'model "nope" not found, try pulling it first'


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(400, False), (429, True), (500, True), (503, True)],
)
def test_http_errors_are_classified_by_status(status, retryable):
    with OllamaFake(fail_first=1, fail_status=status) as fake:
        err = fails(backend_for(fake), ask())
    assert (err.status, err.retryable) == (status, retryable)
    if status == 503:
        assert err.message.startswith("server busy")


def test_error_line_after_streaming_began_is_a_retryable_error_not_a_success():
    with OllamaFake(error_after=2, error_message="CUDA error: out of memory") as fake:
        err = fails(backend_for(fake), ask())
    assert err.retryable and err.status is None and "CUDA error: out of memory" in err.message


@pytest.mark.parametrize("mode", ["clean", "drop"])
def test_stream_ending_without_done_is_an_error(mode):
    with OllamaFake(truncate_after=2, truncate_mode=mode) as fake:
        err = fails(backend_for(fake), ask())
    assert err.retryable
    if mode == "clean":
        assert "truncated" in err.message


def test_invalid_request_rejected_by_the_client_is_permanent(fake):
    err = fails(backend_for(fake), ask(params={"format": "xml"}))
    assert not err.retryable and "format" in err.message
    assert fake.requests == []


def test_missing_model_or_base_url_is_permanent(fake):
    assert not fails(backend_for(fake, model=""), ask()).retryable
    assert not fails(backend_for(fake, base_url=""), ask()).retryable
    assert fake.requests == []


def test_connection_refused_is_retryable():
    backend = BackendConfig(name="ol", kind="ollama", base_url=f"http://127.0.0.1:{free_port()}", model="m")
    err = fails(backend, ask())
    assert err.retryable and "Connection failed" in err.message


def test_request_timeout_is_the_calls_deadline():
    with OllamaFake(latency_s=LONG_S) as fake:
        t0 = time.monotonic()
        err = fails(backend_for(fake), ask(timeout_s=0.3))
        assert time.monotonic() - t0 < LONG_S / 2  # the deadline, not the server's answer
    assert err.retryable and "Timed out after 0.3s" in err.message


def test_deadline_is_checked_while_a_slow_stream_trickles():
    with OllamaFake(reply=" ".join(["w"] * int(LONG_S / 0.05)), chunk_delay_s=0.05) as fake:
        t0 = time.monotonic()
        err = fails(backend_for(fake), ask(timeout_s=0.4))  # every read is quicker than 0.4 s
        assert time.monotonic() - t0 < LONG_S / 2  # the deadline, not the end of the answer
    assert err.retryable and "Timed out after 0.4s (streaming)" in err.message


def test_backend_timeout_caps_a_longer_job_timeout():
    with OllamaFake(latency_s=LONG_S) as fake:
        t0 = time.monotonic()
        err = fails(backend_for(fake, timeout_s=0.3), ask(timeout_s=LONG_S * 2))
        assert time.monotonic() - t0 < LONG_S / 2 and err.retryable
    assert "Timed out after 0.3s" in err.message


# --- probes ------------------------------------------------------------------------------
def test_probe_reports_version_models_and_capabilities(fake):
    result = probe(backend_for(fake, model="llava"))
    assert result.ok and result.status == "ok"
    assert result.version == "0.12.6" and result.models == ["llama3.2:latest", "llava:latest"]
    assert result.capabilities == ["completion", "vision"]
    assert [r.path for r in fake.requests] == ["/api/version", "/api/tags", "/api/show"]


def test_probe_flags_a_model_that_is_not_pulled(fake):
    result = probe(backend_for(fake, model="mistral"))
    assert (result.ok, result.status) == (False, "error") and "not pulled" in result.detail


def test_probe_of_an_unreachable_server_is_down():
    result = probe(BackendConfig(name="x", kind="ollama", base_url=f"http://127.0.0.1:{free_port()}"), timeout_s=1)
    assert (result.ok, result.status) == (False, "down")


def test_supports_multimodal_follows_the_vision_capability(fake):
    assert supports_multimodal(backend_for(fake, model="llava")) is True
    assert supports_multimodal(backend_for(fake, model="llama3.2")) is False
    assert supports_multimodal(backend_for(fake, model="missing")) is None
    assert supports_multimodal(replace(backend_for(fake), kind="openai")) is None


# --- end to end --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_job_runs_on_ollama_through_a_real_worker(api, fake):
    Backend.objects.create(
        name="ollama-local",
        kind=BackendKind.OLLAMA,
        base_url=fake.url,
        model="llava",
        supports_multimodal=True,
        cost_input_per_1k="1.0",
        cost_output_per_1k="3.0",
        config={"keep_alive": "5m"},
    )
    policies.activate(RoutingPolicy.objects.create(name="p", strategy="ordered", params={"order": ["ollama-local"]}))
    r = api.post("/jobs", {"prompt": "describe this picture", "images": [PNG_1PX], "max_tokens": 2}, format="json")
    assert r.status_code == 202, r.content
    run_worker_burst()
    job = Job.objects.get(pk=r.json()["id"])
    assert job.state == JobState.SUCCEEDED, job.error
    assert (job.output, job.finish_reason) == ("describe this", "length")
    assert (job.prompt_tokens, job.completion_tokens) == (3, 2)
    assert float(job.cost) == pytest.approx((3 * 1.0 + 2 * 3.0) / 1000)
    body = fake.last.body
    assert body["messages"][-1]["images"] == [PNG_1PX] and body["keep_alive"] == "5m"
    assert body["options"]["num_predict"] == 2


def test_streamed_content_reaches_the_delta_sink_as_it_comes(fake):
    got: list[dict] = []
    result = OllamaAdapter().generate(backend_for(fake), ask(on_delta=got.append))
    assert got == [{"content": "one"}, {"content": " two"}, {"content": " three"}]
    assert "".join(d["content"] for d in got) == result.output and result.tool_calls == []
