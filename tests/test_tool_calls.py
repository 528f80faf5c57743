"""Tool calls and structured output end to end: both adapters against their fakes, the job's row and
/result, and the response_format check."""

from __future__ import annotations

import json
import threading

import pytest

from jobs import deltas
from jobs.models import Job, JobState
from routing.models import Backend, BackendKind
from tests.factories import ask, make_job
from tests.fakes.ollama_server import OllamaFake
from tests.fakes.openai_server import OpenAIFake
from workers.backends.base import BackendConfig
from workers.backends.dev import DevAdapter
from workers.backends.ollama import OllamaAdapter
from workers.backends.openai import OpenAIAdapter
from workers.execution.job_run import RunContext, run_claimed

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def openai_backend(fake: OpenAIFake, **config) -> BackendConfig:
    return BackendConfig(name="oa", kind="openai", base_url=fake.base_url, model="gpt-test", config=config)


def ollama_backend(fake: OllamaFake) -> BackendConfig:
    return BackendConfig(name="ol", kind="ollama", base_url=fake.url, model="llama3.2")


def collect() -> tuple[list[dict], object]:
    got: list[dict] = []
    return got, got.append


# --- OpenAI-compatible ----------------------------------------------------------------------------
@pytest.mark.parametrize("streamed", [True, False])
def test_openai_tool_calls_come_back_in_openai_shape_with_finish_reason_tool_calls(streamed):
    got, sink = collect()
    with OpenAIFake(tool_calls=[CALL]) as fake:
        result = OpenAIAdapter().generate(
            openai_backend(fake, stream=streamed),
            ask(tools=TOOLS, tool_choice="auto", on_delta=sink),
        )
        body = fake.last.body
    assert body["tools"] == TOOLS and body["tool_choice"] == "auto"
    assert result.finish_reason == "tool_calls" and result.output == ""
    (call,) = result.tool_calls
    assert call["type"] == "function" and call["id"].startswith("call_fake")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == CALL["arguments"]
    deltas_ = [c for d in got for c in d.get("tool_calls", [])]
    assert deltas_[0]["id"] == call["id"] and deltas_[0]["function"]["name"] == "get_weather"
    assert "".join(d["function"].get("arguments", "") for d in deltas_) == call["function"]["arguments"]
    if streamed:  # OpenAI's way: the id first with empty arguments, then fragments
        assert deltas_[0]["function"]["arguments"] == "" and len(deltas_) > 3
        assert all(set(d) == {"index", "function"} and d["index"] == 0 for d in deltas_[1:])


def test_openai_request_carries_sampling_and_response_format_fields():
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}
    with OpenAIFake() as fake:
        result = OpenAIAdapter().generate(
            openai_backend(fake), ask(response_format=fmt, stop=["\n\n"], top_p=0.5, seed=7, tool_choice="auto")
        )
        body = fake.last.body
    assert body["response_format"] == fmt and body["stop"] == ["\n\n"] and (body["top_p"], body["seed"]) == (0.5, 7)
    assert "tool_choice" not in body  # no tools: OpenAI would refuse a tool_choice
    assert json.loads(result.output) == {"echo": "one two three"}


def test_openai_messages_keep_tool_fields_and_content_parts():
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": CALL}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ]
    with OpenAIFake() as fake:
        OpenAIAdapter().generate(openai_backend(fake), ask(messages=messages))
        sent = fake.last.body["messages"]
    assert sent[0]["content"] == [{"type": "text", "text": "weather?"}]
    assert sent[1]["tool_calls"][0]["id"] == "c1" and sent[2]["tool_call_id"] == "c1"


# --- Ollama ---------------------------------------------------------------------------------------
def test_ollama_tool_calls_become_openai_calls_with_json_text_arguments_and_ids():
    got, sink = collect()
    with OllamaFake(tool_calls=[CALL, {"name": "get_time", "arguments": {}}]) as fake:
        result = OllamaAdapter().generate(ollama_backend(fake), ask(tools=TOOLS, on_delta=sink))
        body = fake.last.body
    assert body["tools"] == TOOLS
    assert result.finish_reason == "tool_calls"
    assert [c["id"] for c in result.tool_calls] == ["call_0", "call_1"]
    assert json.loads(result.tool_calls[0]["function"]["arguments"]) == CALL["arguments"]
    assert result.tool_calls[1]["function"] == {"name": "get_time", "arguments": "{}"}
    (delta,) = got
    assert [d["index"] for d in delta["tool_calls"]] == [0, 1] and delta["tool_calls"][0]["id"] == "call_0"


def test_ollama_tool_choice_none_offers_no_tools_and_a_named_one_only_it():
    other = {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}
    with OllamaFake() as fake:
        OllamaAdapter().generate(ollama_backend(fake), ask(tools=TOOLS, tool_choice="none"))
        assert not fake.last.body.get("tools")  # the client sends an empty list
        choice = {"type": "function", "function": {"name": "other"}}
        OllamaAdapter().generate(ollama_backend(fake), ask(tools=[*TOOLS, other], tool_choice=choice))
        assert fake.last.body["tools"] == [other]


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "json_object"}, "json"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}, SCHEMA),
        ({"type": "text"}, None),
    ],
)
def test_ollama_maps_response_format_to_format_and_sampling_to_options(response_format, expected):
    with OllamaFake() as fake:
        OllamaAdapter().generate(
            ollama_backend(fake), ask(response_format=response_format, stop=["END"], top_p=0.3, seed=11)
        )
        body = fake.last.body
    assert body.get("format") == expected
    assert body["options"]["stop"] == ["END"] and body["options"]["top_p"] == 0.3 and body["options"]["seed"] == 11


def test_ollama_messages_get_tool_names_object_arguments_and_content_part_text():
    text_call = {"name": "get_weather", "arguments": json.dumps(CALL["arguments"])}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "weather"}, {"type": "text", "text": "please"}]},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c9", "type": "function", "function": text_call}]},
        {"role": "tool", "tool_call_id": "c9", "content": "sunny"},
    ]
    with OllamaFake() as fake:
        OllamaAdapter().generate(ollama_backend(fake), ask(messages=messages))
        sent = fake.last.body["messages"]
    assert sent[0]["content"] == "weather please"
    assert sent[1]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": CALL["arguments"]}}]
    assert sent[2]["role"] == "tool" and sent[2]["tool_name"] == "get_weather"


# --- the dev backend ------------------------------------------------------------------------------
def test_dev_backend_echoes_the_text_parts_of_the_last_user_message_word_by_word():
    got, sink = collect()
    parts = [
        {"type": "text", "text": "hello  there"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "world"},
    ]
    messages = [{"role": "user", "content": "first"}, {"role": "user", "content": parts}]
    result = DevAdapter().generate(BackendConfig(name="d", kind="dev"), ask(messages=messages, on_delta=sink))
    assert result.output == "hello  there world"
    assert got == [{"content": "hello"}, {"content": "  there"}, {"content": " world"}]
    assert result.prompt_tokens == 4


# --- through a job --------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("streamed", [True, False])
def test_tool_calls_are_stored_on_the_job_and_in_its_result(api, user, streamed):
    with OpenAIFake(tool_calls=[CALL]) as fake:
        backend = Backend.objects.create(
            name="oa", kind=BackendKind.OPENAI, base_url=fake.base_url, model="gpt-test", config={"stream": streamed}
        )
        job = make_job(backend, prompt="weather?", params={"tools": TOOLS}, created_by=user, stream=True)
        assert job.mark_running("w")
        run_claimed(job, RunContext("w"))
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and job.finish_reason == "tool_calls"
    assert job.tool_calls[0]["function"]["name"] == "get_weather"
    result = api.get(f"/jobs/{job.pk}/result").json()
    assert result["tool_calls"] == job.tool_calls and result["finish_reason"] == "tool_calls"
    assert deltas.drain()
    end = deltas.read(job.pk)[-1][1]
    assert end["type"] == "end" and end["finish_reason"] == "tool_calls"


@pytest.mark.django_db
def test_the_admin_timeline_shows_tool_calls(admin_client):
    job = make_job(
        None,
        state=JobState.SUCCEEDED,
        finish_reason="tool_calls",
        tool_calls=[{"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"a":1}'}}],
    )
    page = admin_client.get(f"/admin/jobs/job/{job.pk}/change/").content.decode()
    assert 'id="tl-tool-calls"' in page and "get_weather" in page and "call_7" in page


def run_dev(prompt: str, response_format: dict) -> Job:
    backend = Backend.objects.get_or_create(name="dev-json", kind=BackendKind.DEV)[0]
    job = make_job(backend, prompt=prompt, params={"response_format": response_format})
    assert job.mark_running("w")
    run_claimed(job, RunContext("w"))
    job.refresh_from_db()
    return job


STRICT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


@pytest.mark.django_db(transaction=True)
def test_strict_json_schema_violation_fails_at_once_naming_where_and_why():
    job = run_dev('{"name": "Ada", "age": -3}', STRICT)
    assert job.state == JobState.FAILED and job.attempt_count == 1  # permanent: no retry
    assert "schema violation at $.age" in job.error and "-3 is less than the minimum of 0" in job.error
    job = run_dev('{"name": "Ada"}', STRICT)
    assert "schema violation at $" in job.error and "'age' is a required property" in job.error
    assert run_dev('{"name": "Ada", "age": 36}', STRICT).state == JobState.SUCCEEDED


@pytest.mark.django_db(transaction=True)
def test_non_strict_schema_only_guides_and_json_object_must_be_an_object():
    loose = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    assert run_dev('{"name": 1}', loose).state == JobState.SUCCEEDED
    assert run_dev('{"ok": true}', {"type": "json_object"}).state == JobState.SUCCEEDED
    job = run_dev("[1, 2]", {"type": "json_object"})
    assert job.state == JobState.FAILED and "not an object (a array)" in job.error
    job = run_dev("not json at all", {"type": "json_object"})
    assert job.state == JobState.FAILED and "not valid JSON" in job.error


@pytest.mark.django_db(transaction=True)
def test_invalid_json_from_a_backend_under_strict_schema_fails_the_job():
    with OllamaFake(reply="sorry, no JSON here") as fake:
        backend = Backend.objects.create(name="ol", kind=BackendKind.OLLAMA, base_url=fake.url, model="llama3.2")
        job = make_job(backend, prompt="x", params={"response_format": STRICT})
        assert job.mark_running("w")
        run_claimed(job, RunContext("w"))
        assert fake.last.body["format"] == SCHEMA
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "Structured output check failed" in job.error


def test_threads_share_nothing_in_the_sink():  # the sink is per request: concurrent calls do not mix
    outs: dict[int, list[dict]] = {i: [] for i in range(4)}

    def run(i: int) -> None:
        DevAdapter().generate(
            BackendConfig(name="d", kind="dev"),
            ask(messages=[{"role": "user", "content": f"n{i} a b"}], on_delta=outs[i].append),
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all("".join(d["content"] for d in outs[i]) == f"n{i} a b" for i in range(4))
