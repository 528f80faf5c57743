"""The fake servers speak the real protocols: the official ``ollama`` client and ``openai`` SDK accept them."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import ollama
import openai
import pytest

from tests.fakes.ollama_server import OllamaFake
from tests.fakes.openai_server import OpenAIFake

PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
USER = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture
def ollama_fake():
    with OllamaFake() as fake:
        yield fake


@pytest.fixture
def openai_fake():
    with OpenAIFake(api_key="sk-test-123") as fake:
        yield fake


# --- Ollama ----------------------------------------------------------------------------
def test_ollama_client_chat_streams_ndjson_ending_with_done_and_usage(ollama_fake):
    chunks = list(ollama.Client(host=ollama_fake.url).chat(model="llama3.2", messages=USER, stream=True))
    assert "".join(c.message.content for c in chunks) == "tell me a story"
    assert [c.done for c in chunks] == [False] * 4 + [True]
    last = chunks[-1]
    assert (last.done_reason, last.prompt_eval_count, last.eval_count) == ("stop", 4, 4)
    assert last.total_duration and last.eval_duration
    assert ollama_fake.last.headers["content-type"] == "application/json"


def test_ollama_client_chat_non_streaming_and_num_predict(ollama_fake):
    r = ollama.Client(host=ollama_fake.url).chat(
        model="llama3.2", messages=USER, stream=False, options={"num_predict": 2}
    )
    assert (r.message.content, r.done, r.done_reason, r.eval_count) == ("tell me", True, "length", 2)
    assert ollama_fake.last.body["stream"] is False


def test_ollama_client_generate_list_show_and_version(ollama_fake):
    client = ollama.Client(host=ollama_fake.url)
    assert client.generate(model="llama3.2", prompt="a b c").response == "a b c"
    assert [m.model for m in client.list().models] == ["llama3.2:latest", "llava:latest"]
    assert client.show("llava").capabilities == ["completion", "vision"]
    assert httpx.get(f"{ollama_fake.url}/api/version").json() == {"version": "0.12.6"}


def test_ollama_client_sends_images_as_base64_on_the_message(ollama_fake):
    messages = [{"role": "user", "content": "what is this", "images": [PNG_1PX]}]
    ollama.Client(host=ollama_fake.url).chat(model="llava", messages=messages)
    assert ollama_fake.last.body["messages"][0]["images"] == [PNG_1PX]


@pytest.mark.parametrize(
    ("knobs", "model", "status", "message"),
    [
        ({}, "missing-model", 404, 'model "missing-model" not found, try pulling it first'),
        ({"fail_first": 1}, "llama3.2", 503, "server busy, please try again.  maximum pending requests exceeded"),
    ],
)
def test_ollama_errors_reach_the_client_with_status_and_message(knobs, model, status, message):
    with OllamaFake(**knobs) as fake:
        client = ollama.Client(host=fake.url)
        with pytest.raises(ollama.ResponseError) as err:
            client.chat(model=model, messages=USER)
        assert (err.value.status_code, err.value.error) == (status, message)
        fake.fail_first = fake.generation_calls + knobs.get("fail_first", 0)  # fail the next call the same way
        with pytest.raises(ollama.ResponseError) as err:
            list(client.chat(model=model, messages=USER, stream=True))
        assert (err.value.status_code, err.value.error) == (status, message)


def test_ollama_bad_requests_are_400_with_an_error_object(ollama_fake):
    for body in (
        b"{not json",
        b'{"messages": []}',
        b'{"model": "llava", "messages": [{"role": "user", "images": ["%%"]}]}',
    ):
        r = httpx.post(f"{ollama_fake.url}/api/chat", content=body)
        assert r.status_code == 400 and set(r.json()) == {"error"}, body
    assert httpx.post(f"{ollama_fake.url}/api/nope").text == "404 page not found"


def test_ollama_mid_stream_error_line_is_raised_by_the_client():
    with OllamaFake(error_after=2, error_message="runner crashed") as fake:
        seen = []
        with pytest.raises(ollama.ResponseError, match="runner crashed"):
            for chunk in ollama.Client(host=fake.url).chat(model="llama3.2", messages=USER, stream=True):
                seen.append(chunk.message.content)
        assert seen == ["tell", " me"]


def test_ollama_truncated_stream_has_no_done_line():
    with OllamaFake(truncate_after=2) as fake:
        chunks = list(ollama.Client(host=fake.url).chat(model="llama3.2", messages=USER, stream=True))
        assert len(chunks) == 2 and not any(c.done for c in chunks)


# --- OpenAI-compatible -----------------------------------------------------------------
def sdk(fake: OpenAIFake, key: str = "sk-test-123", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key=key, max_retries=kw.pop("max_retries", 0), **kw)


def test_openai_sdk_chat_completion_non_streaming(openai_fake):
    r = sdk(openai_fake).chat.completions.create(model="gpt-test", messages=USER, max_tokens=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("tell me a", "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 3, 7)
    req = openai_fake.last
    assert (req.method, req.path, req.headers["authorization"]) == (
        "POST",
        "/v1/chat/completions",
        "Bearer sk-test-123",
    )


def test_openai_sdk_chat_completion_streaming_sse_with_usage(openai_fake):
    stream = sdk(openai_fake).chat.completions.create(
        model="gpt-test", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tell me a story"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 4


def test_openai_sdk_sends_image_parts_and_lists_models(openai_fake):
    content = [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_1PX}"}},
    ]
    client = sdk(openai_fake)
    r = client.chat.completions.create(model="llava-test", messages=[{"role": "user", "content": content}])
    assert r.choices[0].message.content == "describe"
    assert openai_fake.last.body["messages"][0]["content"][1]["image_url"]["url"].endswith(PNG_1PX)
    assert [m.id for m in client.models.list()] == ["gpt-test", "llava-test"]


@pytest.mark.parametrize("style", ["nested", "flat"])
def test_openai_sdk_reads_both_error_shapes(style):
    with OpenAIFake(error_style=style) as fake:
        with pytest.raises(openai.NotFoundError) as err:
            sdk(fake).chat.completions.create(model="nope", messages=USER)
        assert "The model `nope` does not exist." in err.value.message
        body = err.value.body if style == "nested" else err.value.response.json()
        assert body["message"] == "The model `nope` does not exist."
        if style == "flat":
            assert body["object"] == "error" and body["code"] == 404


def test_openai_wrong_key_is_401_and_bad_request_is_400(openai_fake):
    with pytest.raises(openai.AuthenticationError):
        sdk(openai_fake, key="sk-wrong").chat.completions.create(model="gpt-test", messages=USER)
    with pytest.raises(openai.BadRequestError, match="messages"):
        sdk(openai_fake).chat.completions.create(model="gpt-test", messages=[])


def test_openai_sdk_honours_the_fakes_429_retry_after_and_retries():
    with OpenAIFake(fail_first=1, fail_status=429, retry_after="0") as fake:
        r = sdk(fake, max_retries=1).chat.completions.create(model="gpt-test", messages=USER)
        assert r.choices[0].message.content == "tell me a story"
        assert fake.generation_calls == 2
    with OpenAIFake(fail_first=1, fail_status=429, retry_after="7") as fake:
        with pytest.raises(openai.RateLimitError) as err:
            sdk(fake).chat.completions.create(model="gpt-test", messages=USER)
        assert err.value.response.headers["retry-after"] == "7" and err.value.code == "rate_limit_exceeded"


def test_openai_llama_cpp_health_and_loading():
    with OpenAIFake(loading=True) as fake:
        r = httpx.get(f"{fake.url}/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"
        fake.loading = False
        assert httpx.get(f"{fake.url}/health").json() == {"status": "ok"}


# --- shared knobs ----------------------------------------------------------------------
def test_fail_rate_is_reproducible_and_latency_delays_answers():
    def outcomes() -> list[int]:
        with OpenAIFake(fail_rate=0.5, seed=7) as fake, httpx.Client(base_url=fake.base_url) as client:
            body = {"model": "gpt-test", "messages": USER}
            return [client.post("/chat/completions", json=body).status_code for _ in range(12)]

    first = outcomes()
    assert first == outcomes() and {200, 503} == set(first)
    with OllamaFake(latency_s=0.2) as fake:
        t0 = time.monotonic()
        httpx.get(f"{fake.url}/api/version")
        assert time.monotonic() - t0 >= 0.2


def test_stop_does_not_wait_for_slow_handlers():
    fake = OllamaFake(latency_s=30).start()
    url = fake.url

    def slow_call() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the stop cuts this call off; that is the point
            httpx.get(f"{url}/api/version", timeout=60)

    threading.Thread(target=slow_call, daemon=True).start()
    while not fake.requests:
        time.sleep(0.01)
    t0 = time.monotonic()
    fake.stop()
    assert time.monotonic() - t0 < 2
