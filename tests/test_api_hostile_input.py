"""Hostile JSON never reaches a 500: deep nesting, non-finite numbers and token counts over the caps
are each a 400 naming where, and leave no row, no queue entry and no idempotency key behind."""

from __future__ import annotations

import json

import pytest

from jobs.models import Job
from routing.models import Backend
from tests.test_api_validation import assert_nothing_left, post

pytestmark = pytest.mark.django_db(transaction=True)


def nested(depth: int, leaf: str = "1") -> str:
    """A JSON value ``{"a": {"a": ... leaf}}`` that opens ``depth`` objects."""
    return '{"a": ' * depth + leaf + "}" * depth


def assert_refused_then_retry_works(api, redis, raw: str | dict, field: str, *words: str) -> dict:
    """400 naming ``field`` (and ``words`` in its message), nothing kept; the same key then takes a good body."""
    key = "hostile-then-fixed"
    resp = post(api, raw, key=key)
    assert resp.status_code == 400, (resp.status_code, resp.content[:300])
    body = resp.json()
    assert field in body, body
    text = json.dumps(body)
    for word in words:
        assert word in text, (word, body)
    assert_nothing_left(redis)
    retry = post(api, {"prompt": "fine now"}, key=key)
    assert retry.status_code == 202, retry.content
    assert Job.objects.count() == 1
    return body


# --- nesting ----------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [32, 1_000, 100_000], ids=["just-over", "recursion-depth", "huge"])
def test_metadata_nested_too_deep_is_400_naming_the_path(api, policy, redis_db, depth):
    raw = '{"prompt": "hi", "metadata": ' + nested(depth) + "}"
    body = assert_refused_then_retry_works(api, redis_db, raw, "metadata", "deeper than 32 levels")
    assert "metadata.a.a.a" in body["detail"]


def test_nesting_inside_an_array_names_the_index(api, policy, redis_db):
    raw = '{"messages": [{"role": "user", "content": ' + "[" * 40 + "]" * 40 + "}]}"
    body = assert_refused_then_retry_works(api, redis_db, raw, "messages", "deeper than 32 levels")
    assert "messages[0].content[0][0]" in body["detail"]


def test_params_nested_too_deep_is_400(api, policy, redis_db):
    raw = '{"prompt": "hi", "params": {"stop": ' + "[" * 1200 + "]" * 1200 + "}}"
    assert_refused_then_retry_works(api, redis_db, raw, "params", "params.stop[0]")


def test_nesting_at_the_limit_is_accepted(api, policy, redis_db, settings):
    settings.REQUEST_JSON_MAX_DEPTH = 8
    ok = post(api, '{"prompt": "hi", "metadata": ' + nested(7) + "}")  # the body itself is level 1
    assert ok.status_code == 202, ok.content
    too_deep = post(api, '{"prompt": "hi", "metadata": ' + nested(8) + "}")
    assert too_deep.status_code == 400 and "deeper than 8 levels" in too_deep.json()["detail"]


def test_the_registry_api_uses_the_same_parser(staff_api, redis_db):
    raw = '{"name": "deep", "kind": "dev", "config": ' + nested(2_000) + "}"
    resp = staff_api.post("/backends", raw, content_type="application/json")
    assert resp.status_code == 400, resp.content[:300]
    assert "config" in resp.json()
    assert not Backend.objects.filter(name="deep").exists()


# --- non-finite numbers -----------------------------------------------------------------------
NON_FINITE = {
    "metadata-1e400": ('{"prompt": "hi", "metadata": {"score": 1e400}}', "metadata", "metadata.score"),
    "metadata-negative-overflow": ('{"prompt": "hi", "metadata": {"x": [1, -2e999]}}', "metadata", "metadata.x[1]"),
    "params-NaN": ('{"prompt": "hi", "params": {"top_p": NaN}}', "params", "params.top_p"),
    "params-Infinity": ('{"prompt": "hi", "params": {"seed": Infinity}}', "params", "params.seed"),
    "params-minus-Infinity": ('{"prompt": "hi", "params": {"o": {"p": -Infinity}}}', "params", "params.o.p"),
    "temperature-1e400": ('{"prompt": "hi", "temperature": 1e400}', "temperature", "temperature"),
}


@pytest.mark.parametrize("raw, field, path", NON_FINITE.values(), ids=NON_FINITE.keys())
def test_a_non_finite_number_is_400_naming_the_field(api, policy, redis_db, raw, field, path):
    body = assert_refused_then_retry_works(api, redis_db, raw, field, "not a finite number")
    assert body["detail"].startswith(path + ":"), body


# PostgreSQL's text and jsonb cannot hold these (found by the fuzz run on PostgreSQL: a 500).
UNSTORABLE = {
    "nul-in-a-params-key": (r'{"prompt": "hi", "params": {"a\u0000b": 1}}', "params", "params.a"),
    "nul-in-metadata": (r'{"prompt": "hi", "metadata": {"k": ["x", "\u0000"]}}', "metadata", "metadata.k[1]"),
    "lone-surrogate": (r'{"prompt": "hi", "metadata": {"k": "\ud825x"}}', "metadata", "metadata.k"),
    "lone-surrogate-key": (r'{"prompt": "hi", "params": {"\udc00": 1}}', "params", r"params.\udc00:"),
}


@pytest.mark.parametrize("raw, field, path", UNSTORABLE.values(), ids=UNSTORABLE.keys())
def test_a_nul_or_unpaired_surrogate_is_400_naming_the_field(api, policy, redis_db, raw, field, path):
    body = assert_refused_then_retry_works(api, redis_db, raw, field, "cannot be stored")
    assert body["detail"].startswith(path), body


def test_paired_surrogates_and_an_escaped_backslash_are_accepted(api, policy, redis_db):
    resp = post(api, r'{"prompt": "hi \ud83d\ude00", "metadata": {"path": "C:\\u0000dir"}}')
    assert resp.status_code == 202, resp.content


def test_a_large_finite_number_is_still_accepted(api, policy, redis_db):
    resp = post(api, '{"prompt": "hi", "metadata": {"big": 1e300, "small": -1.5e-300}}')
    assert resp.status_code == 202, resp.content


# --- token counts under every backend's name --------------------------------------------------
TOKEN_PARAMS = {
    "max_tokens": ({"max_tokens": 1_000_000}, "max_tokens"),
    "max_completion_tokens": ({"max_completion_tokens": 40_000}, "max_completion_tokens"),
    "num_predict": ({"num_predict": 10**9}, "num_predict"),
    "num_predict-unlimited": ({"num_predict": -1}, "num_predict"),
    "max_new_tokens-not-a-number": ({"max_new_tokens": "lots"}, "max_new_tokens"),
    "num_ctx": ({"num_ctx": 10**7}, "num_ctx"),
    "options-num_predict": ({"options": {"num_predict": -2}}, "options.num_predict"),
    "options-num_ctx": ({"options": {"num_ctx": 10**7}}, "options.num_ctx"),
}


@pytest.mark.parametrize("params, name", TOKEN_PARAMS.values(), ids=TOKEN_PARAMS.keys())
def test_params_over_the_token_caps_are_400_naming_the_param(api, policy, redis_db, params, name):
    assert_refused_then_retry_works(api, redis_db, {"prompt": "hi", "params": params}, "params", f"{name}:")


def test_params_within_the_caps_are_accepted(api, policy, redis_db):
    params = {"max_tokens": 100, "num_ctx": 4096, "options": {"num_predict": 50}, "top_p": 0.9}
    resp = post(api, {"prompt": "hi", "params": params})
    assert resp.status_code == 202, resp.content
    assert Job.objects.get().params == params


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": 5, "kind": "dev"}, "name"),
        ({"name": "b", "kind": "dev", "model": 7}, "model"),
        ({"name": "b", "kind": "dev", "api_key": 5}, "api_key"),
        ({"name": "b", "kind": "openai", "base_url": 1234, "model": "m"}, "base_url"),
    ],
)
def test_the_registry_takes_only_json_strings_for_string_fields(staff_api, body, field):
    """DRF would turn a JSON number into a string; the schema says string, so it is a 400 naming the field."""
    r = staff_api.post("/backends", body, format="json")
    assert r.status_code == 400, r.content
    assert field in r.json()
    assert not Backend.objects.exists()


@pytest.mark.django_db
def test_a_policy_name_must_be_a_json_string(staff_api):
    r = staff_api.post("/policies", {"name": 12, "strategy": "ordered", "params": {}}, format="json")
    assert r.status_code == 400 and "name" in r.json(), r.content
