"""The batch input parser (``batches.jsonl``): one line at a time, each problem named by its line."""

from __future__ import annotations

import io
import json

import pytest
from django.conf import settings

from batches import jsonl
from routing import registry
from routing.models import Backend, BackendKind
from tenants.models import Tenant


def line(custom_id="a", body=None, **extra) -> bytes:
    item = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
    item["body"] = body if body is not None else {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    item.update(extra)
    return json.dumps(item).encode() + b"\n"


@pytest.fixture
def snap(db):
    Backend.objects.create(name="dev", kind=BackendKind.DEV, model="echo")
    Backend.objects.create(name="big", kind=BackendKind.DEV, model="large")
    return registry.snapshot(registry.ensure_token(None))


def check(raw: bytes | None, snap, seen=None, tenant=None):
    return jsonl.check_line(
        7,
        raw,
        snap=snap,
        tenant=tenant,
        limits=settings.JOB_LIMITS,
        seen=set() if seen is None else seen,
        max_bytes=4096,
    )


def test_read_lines_numbers_lines_skips_blank_ones_and_never_holds_a_long_one():
    data = b'{"a": 1}\n\n   \n' + b"x" * 10_000 + b"\n" + b'{"b": 2}'
    got = list(jsonl.read_lines(io.BytesIO(data), max_bytes=100))
    assert got == [(1, b'{"a": 1}\n'), (4, None), (5, b'{"b": 2}')]


def test_a_good_line_becomes_a_job_submission(snap):
    ok = check(line(body={"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}), snap)
    assert isinstance(ok, jsonl.Line)
    assert ok.custom_id == "a" and ok.job["model"] == "echo" and ok.job["max_tokens"] == 5 and "priority" not in ok.job
    pinned = check(line(body={"model": "big", "messages": [{"role": "user", "content": "x"}]}), snap)
    assert pinned.job["backend"] == "big" and "model" not in pinned.job


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b"{not json\n", "invalid_json_line", None),
        (b"[1, 2]\n", "invalid_json_line", None),
        (line(custom_id=None), "missing_required_parameter", "custom_id"),
        (line(method="GET"), "invalid_method", "method"),
        (line(url="/v1/embeddings"), "invalid_url", "url"),
        (line(extra=1), "invalid_request", "extra"),
        (line(body={"model": "echo", "messages": []}), "invalid_request", "messages"),
        (line(body={"model": "echo", "messages": [{"role": "user", "content": "x"}], "n": 3}), "invalid_request", "n"),
        (line(body={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), "model_not_found", "model"),
        (
            line(body={"model": "echo", "messages": [{"role": "user", "content": "x"}], "priority": "high"}),
            "invalid_request",
            "priority",
        ),
        (None, "line_too_long", None),
    ],
)
def test_each_problem_is_named_with_its_line(snap, raw, code, param):
    error = check(raw, snap)
    assert isinstance(error, jsonl.LineError)
    assert (error.line, error.code, error.param) == (7, code, param)
    assert error.as_openai()["line"] == 7 and error.message


def test_duplicate_custom_id_and_a_tenants_backends(snap):
    seen: set[str] = set()
    assert isinstance(check(line("x"), snap, seen), jsonl.Line)
    dup = check(line("x"), snap, seen)
    assert dup.code == "duplicate_custom_id" and dup.param == "custom_id"
    tenant = Tenant(name="acme", allowed_backends=["dev"])
    refused = check(
        line("y", body={"model": "big", "messages": [{"role": "user", "content": "x"}]}), snap, tenant=tenant
    )
    assert refused.code == "model_not_allowed"
