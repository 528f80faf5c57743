"""``/v1`` with OpenAI's own SDK against the real stack: gunicorn with uvicorn workers (as ``make run``),
real ``rqworker`` processes, Redis and the test database; backends are ``dev`` or the fake
OpenAI-compatible server. Also ``GET /jobs/<id>/stream`` and ``/result?wait=`` over the same relays."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from rest_framework.authtoken.models import Token

from jobs.models import Job, JobState
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tenants.models import ApiKey, Tenant
from tests.fakes.openai_server import OpenAIFake

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
SCHEMA = {
    "type": "object",
    "properties": {"echo": {"type": "string"}},
    "required": ["echo"],
    "additionalProperties": False,
}


@pytest.fixture
def stack(gunicorn_server, worker_process, user) -> Iterator[dict]:
    """The web tier (2 processes) and one worker; the dev backend streams a word every 60 ms."""
    Backend.objects.create(name="dev", kind=BackendKind.DEV, model="echo", config={"latency_ms": 0, "token_ms": 60})
    policies.activate(RoutingPolicy.objects.create(name="default", strategy="ordered", params={"order": ["dev"]}))
    base = gunicorn_server(workers=2)
    worker_process()
    token = Token.objects.create(user=user).key
    yield {"base": base, "token": token, "headers": {"Authorization": f"Token {token}"}}


def sdk(stack: dict, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack['base']}/v1", api_key=key or stack["token"], max_retries=0, timeout=60)


def job_of(response_headers) -> Job:
    return Job.objects.get(pk=response_headers["x-job-id"])


def test_completion_and_models_through_the_sdk(stack):
    client = sdk(stack)
    assert [m.id for m in client.models.list()] == ["auto", "dev", "echo"]
    assert client.models.retrieve("echo").id == "echo"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-5")
    assert missing.value.body["code"] == "model_not_found"

    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "hello there"}], max_tokens=50
    )
    answer = raw.parse()
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == "hello there"
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (2, 2, 4)
    job = job_of(raw.headers)
    assert job.state == JobState.SUCCEEDED and job.output == "hello there" and job.max_tokens == 50
    assert answer.id == f"chatcmpl-{job.pk.hex}"


def test_stream_first_chunk_arrives_while_the_job_runs(stack):
    words = " ".join(f"w{i}" for i in range(12))
    client = sdk(stack)
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": words}],
        stream=True,
        stream_options={"include_usage": True},
    )
    job_id = raw.headers["x-job-id"]
    chunks, state_at_first = [], None
    for chunk in raw.parse():
        if state_at_first is None and chunk.choices and chunk.choices[0].delta.content:
            state_at_first = Job.objects.get(pk=job_id).state
        chunks.append(chunk)
    assert state_at_first == JobState.RUNNING  # 12 words x 60 ms: the first arrives long before the end
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == words
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_errors_are_the_sdk_exceptions(stack, user):
    client = sdk(stack)
    with pytest.raises(openai.AuthenticationError):
        sdk(stack, key="wrong").chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="auto", messages=[])
    assert bad.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}], n=2)
    assert unknown.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])

    tenant = Tenant.objects.create(name="acme", rpm_limit=1)
    _, key = ApiKey.issue(tenant, "ci")
    keyed = sdk(stack, key=key)
    keyed.chat.completions.create(model="auto", messages=[{"role": "user", "content": "one"}])
    with pytest.raises(openai.RateLimitError) as limited:
        keyed.chat.completions.create(model="auto", messages=[{"role": "user", "content": "two"}])
    assert limited.value.response.headers["retry-after"]
    assert limited.value.body["type"] == "rate_limit_error" and limited.value.body["code"] == "rpm_limit"
    assert Job.objects.filter(tenant=tenant).count() == 1  # the refused one left nothing
    assert not Job.objects.filter(created_by=user, state=JobState.QUEUED).exists()


def test_failed_job_is_422_and_an_error_event_in_a_stream(stack):
    Backend.objects.create(name="broken", kind=BackendKind.DEV, config={"fail_rate": 1.0, "fail_status": 400})
    client = sdk(stack)
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    assert failed.value.body["code"] == "job_failed"
    with pytest.raises(openai.APIError) as streamed:
        for _ in client.chat.completions.create(
            model="broken", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            pass
    assert type(streamed.value) is openai.APIError  # an error event in the stream, not an HTTP status
    assert streamed.value.body["code"] == "job_failed"


def test_tools_and_response_format_round_trip_through_an_openai_backend(stack):
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    with OpenAIFake(tool_calls=[call], chunk_delay_s=0.01) as fake:
        Backend.objects.create(
            name="remote", kind=BackendKind.OPENAI, base_url=fake.base_url, model="gpt-test", config={"stream": True}
        )
        client = sdk(stack)
        messages = [{"role": "user", "content": "weather in Paris?"}]
        first = client.chat.completions.create(model="remote", messages=messages, tools=TOOLS, tool_choice="auto")
        (made,) = first.choices[0].message.tool_calls
        assert first.choices[0].finish_reason == "tool_calls"
        assert made.function.name == "get_weather" and json.loads(made.function.arguments) == {"city": "Paris"}
        assert fake.last.body["tools"] == TOOLS

        # Streamed, the SDK's accumulated call is the same; then the tool's answer goes back.
        streamed = list(client.chat.completions.create(model="remote", messages=messages, tools=TOOLS, stream=True))
        pieces = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert pieces[0].id and pieces[0].function.name == "get_weather"
        assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {"city": "Paris"}
        follow = [
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [made.model_dump(exclude_none=True)]},
            {"role": "tool", "tool_call_id": made.id, "content": "18 C and sunny"},
        ]
        client.chat.completions.create(model="remote", messages=follow, tools=TOOLS, tool_choice="none")
        sent = fake.last.body["messages"]
        assert sent[1]["tool_calls"][0]["id"] == made.id and sent[2]["tool_call_id"] == made.id

    with OpenAIFake() as fake:
        Backend.objects.create(name="json", kind=BackendKind.OPENAI, base_url=fake.base_url, model="gpt-test")
        fmt = {"type": "json_schema", "json_schema": {"name": "echo", "schema": SCHEMA, "strict": True}}
        shaped = sdk(stack).chat.completions.create(
            model="json", messages=[{"role": "user", "content": "hi"}], response_format=fmt
        )
        assert json.loads(shaped.choices[0].message.content) == {"echo": "hi"}
        assert fake.last.body["response_format"] == fmt


def test_images_stay_where_they_stood_in_the_conversation(stack):
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    with OpenAIFake() as fake:
        Backend.objects.create(
            name="vlm", kind=BackendKind.OPENAI, base_url=fake.base_url, model="llava-test", supports_multimodal=True
        )
        content = [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}", "detail": "low"}},
            {"type": "text", "text": "what is this?"},
        ]
        sdk(stack).chat.completions.create(model="vlm", messages=[{"role": "user", "content": content}])
        (sent,) = fake.last.body["messages"]
    assert sent["content"][0] == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{png}", "detail": "low"},
    }
    assert sent["content"][1] == {"type": "text", "text": "what is this?"}
    job = Job.objects.get(requested_backend="vlm")
    assert job.image_count == 1 and "base64" not in json.dumps(job.messages)  # stored once, in the image store


def test_priority_from_extra_body_and_header(stack):
    client = sdk(stack)
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "x"}], extra_body={"priority": "high"}
    )
    assert job_of(raw.headers).priority == "high"
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "x"}], extra_headers={"X-Priority": "low"}
    )
    assert job_of(raw.headers).priority == "low"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "x"}], extra_body={"priority": "urgent"}
        )
    assert bad.value.body["param"] == "priority"


def test_a_dropped_stream_cancels_its_job(stack):
    body = {
        "model": "auto",
        "stream": True,
        "messages": [{"role": "user", "content": " ".join(["word"] * 200)}],  # 12 s at 60 ms a word
    }
    headers = {"Authorization": f"Bearer {stack['token']}"}
    with httpx.stream("POST", f"{stack['base']}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
        job_id = r.headers["x-job-id"]
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
    deadline = time.monotonic() + 10
    while Job.objects.get(pk=job_id).state != JobState.CANCELED and time.monotonic() < deadline:
        time.sleep(0.1)
    job = Job.objects.get(pk=job_id)
    assert job.state == JobState.CANCELED
    assert len((job.output or "").split()) < 200


def sse(lines: Iterator[str]) -> Iterator[dict]:
    """Server-Sent Events as dicts of their fields."""
    event: dict = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            event[name] = value


def test_job_stream_resumes_from_last_event_id_and_ends_with_the_result(stack, django_user_model):
    headers = stack["headers"]
    job = httpx.post(f"{stack['base']}/jobs", json={"prompt": "a b c d e f", "stream": True}, headers=headers).json()
    url = f"{stack['base']}/jobs/{job['id']}/stream"
    with httpx.stream("GET", url, headers=headers, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
        first, second = next(events), next(events)
    assert first["event"] == "delta" and json.loads(first["data"])["content"] == "a"
    with httpx.stream("GET", url, headers={**headers, "Last-Event-ID": second["id"]}, timeout=30) as r:
        rest = list(sse(r.iter_lines()))
    assert "".join(json.loads(e["data"])["content"] for e in rest if e["event"] == "delta") == " c d e f"
    (end,) = [e for e in rest if e["event"] == "end"]
    assert rest[-1] is end
    assert json.loads(end["data"])["output"] == "a b c d e f"
    as_event_source = httpx.get(url, headers={**headers, "Accept": "text/event-stream"}, timeout=30)
    assert as_event_source.status_code == 200  # EventSource's Accept header, not a 406
    assert as_event_source.headers["content-type"].startswith("text/event-stream")
    (replayed_end,) = [e for e in sse(iter(as_event_source.text.splitlines())) if e.get("event") == "end"]
    assert json.loads(replayed_end["data"])["output"] == "a b c d e f"
    bad = httpx.get(url, headers={**headers, "Last-Event-ID": "nonsense"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()
    missing = httpx.get(f"{stack['base']}/jobs/00000000-0000-0000-0000-000000000000/stream", headers=headers)
    assert missing.status_code == 404
    stranger = Token.objects.create(user=django_user_model.objects.create_user("stranger", password="pw-12345"))
    for path in ("stream", "result?wait=1"):
        theirs = httpx.get(f"{stack['base']}/jobs/{job['id']}/{path}", headers={"Authorization": f"Token {stranger}"})
        assert theirs.status_code == 404, path


def test_result_wait_answers_at_the_end_or_202_after_the_wait(stack):
    headers = stack["headers"]
    job = httpx.post(f"{stack['base']}/jobs", json={"prompt": "x y z"}, headers=headers).json()
    started = time.monotonic()
    done = httpx.get(f"{stack['base']}/jobs/{job['id']}/result?wait=20", headers=headers, timeout=30)
    assert done.status_code == 200 and done.json()["output"] == "x y z"
    assert time.monotonic() - started < 10

    slow = httpx.post(
        f"{stack['base']}/jobs", json={"prompt": " ".join(["w"] * 100)}, headers=headers
    ).json()  # 6 s of words
    started = time.monotonic()
    pending = httpx.get(f"{stack['base']}/jobs/{slow['id']}/result?wait=0.5", headers=headers, timeout=30)
    assert pending.status_code == 202 and pending.headers["retry-after"] == "1"
    assert 0.4 < time.monotonic() - started < 5
    assert httpx.get(f"{stack['base']}/jobs/{slow['id']}/result?wait=abc", headers=headers).status_code == 400


def test_a_plain_wsgi_server_answers_501_not_a_ticket():
    from orchestrator_site import wsgi
    from orchestrator_site.relaying import WsgiTicketGuard, ticket

    assert isinstance(wsgi.application, WsgiTicketGuard)
    closed = []

    class Body(list):
        def close(self) -> None:
            closed.append(True)

    def view(environ, start_response):  # what Django answers for a view that returned a ticket
        response = ticket("job.stream", job_id="j", after="0-0")
        start_response("200 OK", list(response.items()))
        return Body([response.content])

    got: dict = {}
    body = b"".join(WsgiTicketGuard(view)({}, lambda status, headers, exc=None: got.update(status=status)))
    assert got["status"].startswith("501") and closed == [True]
    assert "uvicorn_worker.UvicornWorker" in json.loads(body)["detail"]


def test_models_are_those_the_callers_tenant_may_use(db):
    from rest_framework.test import APIClient

    Backend.objects.create(name="dev", kind=BackendKind.DEV, model="echo")
    Backend.objects.create(name="big", kind=BackendKind.DEV, model="large")
    Backend.objects.create(name="off", kind=BackendKind.DEV, model="gone", enabled=False)
    tenant = Tenant.objects.create(name="acme", allowed_backends=["dev"])
    _, key = ApiKey.issue(tenant, "ci")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["auto", "dev", "echo"]
    assert client.get("/v1/models/large").status_code == 404
    everyone = Tenant.objects.create(name="open")
    _, open_key = ApiKey.issue(everyone, "ci")
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {open_key}")
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["auto", "big", "dev", "echo", "large"]


def test_no_eligible_backend_is_503_in_openais_shape_and_leaves_nothing(api, policy, dev_backend):
    dev_backend.enabled = False
    dev_backend.save()
    body = {"model": "auto", "messages": [{"role": "user", "content": "x"}]}
    r = api.post("/v1/chat/completions", body, format="json")
    assert r.status_code == 503, r.content
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["type"] == "service_unavailable_error"
    assert not Job.objects.exists()


def test_unknown_v1_paths_and_odd_model_names_answer_openais_404(api):
    for method, path in (("post", "/v1/embeddings"), ("get", "/v1/fine_tuning/jobs"), ("get", "/v1/models/a\nb")):
        r = getattr(api, method)(path, {}, format="json")
        assert r.status_code == 404, (path, r.content)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert api.get("/v1/models/org/model-name").json()["error"]["code"] == "model_not_found"
