"""``POST /jobs`` rejects bad input with a 4xx (or 503 when nothing can run it) and leaves nothing behind.

Every rejected request here carries an ``Idempotency-Key``, and every one is checked for
its status, for naming the offending field in the JSON body, and for leaving no job row,
no RQ queue entry and no idempotency key in Redis. Limits are shrunk through the
``settings`` fixture (the create serializer reads ``JOB_LIMITS`` when it is built).
"""

from __future__ import annotations

import base64
import itertools
import json

import pytest
from django.conf import settings as django_settings

from jobs import fair_queue
from jobs.models import Job
from routing.models import Backend, BackendKind, RoutingPolicy

pytestmark = pytest.mark.django_db(transaction=True)

LIMITS = {
    "prompt_chars": 100,
    "messages": 3,
    "images": 2,
    "image_bytes": 1024,
    "max_tokens": 1000,
    "timeout_s": 300,
    "json_field_bytes": 256,
}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00" * 32
PNG_B64 = base64.b64encode(PNG).decode()
_keys = itertools.count()


@pytest.fixture(autouse=True)
def small_limits(settings):
    settings.JOB_LIMITS = dict(LIMITS)


def post(client, body, *, key: str | None = None, **kwargs):
    """POST /jobs with an Idempotency-Key, so a claim left behind by a rejection would show."""
    headers = {"Idempotency-Key": key if key is not None else f"validation-{next(_keys)}"}
    if isinstance(body, (str, bytes)):
        return client.post("/jobs", body, content_type=kwargs.pop("content_type", "application/json"), headers=headers)
    return client.post("/jobs", body, format="json", headers=headers)


def assert_nothing_left(redis) -> None:
    assert Job.objects.count() == 0, "a rejected request left a job row"
    assert fair_queue.depths(django_settings.JOB_QUEUES) == dict.fromkeys(django_settings.JOB_QUEUES, 0)
    assert list(redis.scan_iter("rq:job:*")) == [], "a rejected request left an RQ job"
    assert list(redis.scan_iter("llmo:idem:*")) == [], "a rejected request left its idempotency key"


def assert_rejected(resp, status: int, field: str, redis) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.content)
    assert resp["Content-Type"].startswith("application/json")
    body = resp.json()
    assert field in body, f"{field!r} not named in {body}"
    assert_nothing_left(redis)
    return body


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


MSG = {"role": "user", "content": "hi"}

INVALID_BODIES = {
    # exactly one of prompt / messages
    "neither-prompt-nor-messages": ({}, "prompt"),
    "only-options": ({"priority": "high"}, "prompt"),
    "both-prompt-and-messages": ({"prompt": "a", "messages": [MSG]}, "prompt"),
    "empty-prompt": ({"prompt": ""}, "prompt"),
    "null-prompt": ({"prompt": None}, "prompt"),
    # wrong types
    "prompt-number": ({"prompt": 123}, "prompt"),
    "prompt-bool": ({"prompt": True}, "prompt"),
    "prompt-list": ({"prompt": ["a", "b"]}, "prompt"),
    "prompt-object": ({"prompt": {"text": "a"}}, "prompt"),
    "messages-string": ({"messages": "hello"}, "messages"),
    "messages-object": ({"messages": MSG}, "messages"),
    "messages-empty": ({"messages": []}, "messages"),
    "message-not-object": ({"messages": ["hello"]}, "messages"),
    "message-content-number": ({"messages": [{"role": "user", "content": 42}]}, "messages"),
    "message-content-list": ({"messages": [{"role": "user", "content": ["a"]}]}, "messages"),
    "priority-number": ({"prompt": "a", "priority": 1}, "priority"),
    "max-tokens-string": ({"prompt": "a", "max_tokens": "many"}, "max_tokens"),
    "max-tokens-fraction": ({"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    "temperature-string": ({"prompt": "a", "temperature": "hot"}, "temperature"),
    "timeout-string": ({"prompt": "a", "timeout_s": "soon"}, "timeout_s"),
    "requires-multimodal-string": ({"prompt": "a", "requires_multimodal": "maybe"}, "requires_multimodal"),
    "metadata-list": ({"prompt": "a", "metadata": [1, 2]}, "metadata"),
    "params-string": ({"prompt": "a", "params": "x"}, "params"),
    "images-string": ({"prompt": "a", "images": PNG_B64}, "images"),
    "image-number": ({"prompt": "a", "images": [123]}, "images"),
    "model-too-long": ({"prompt": "a", "model": "m" * 201}, "model"),
    "backend-not-a-slug": ({"prompt": "a", "backend": "not a slug!"}, "backend"),
    # enums
    "unknown-priority": ({"prompt": "a", "priority": "urgent"}, "priority"),
    "priority-wrong-case": ({"prompt": "a", "priority": "HIGH"}, "priority"),
    "bad-message-role": ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    "message-without-role": ({"messages": [{"content": "x"}]}, "messages"),
    "message-without-content": ({"messages": [{"role": "user"}]}, "messages"),
    "message-unknown-field": ({"messages": [{**MSG, "nmae": "x"}]}, "messages"),
    # unknown top-level fields
    "unknown-field": ({"prompt": "a", "promt": "typo"}, "promt"),
    "unknown-field-with-messages": ({"messages": [MSG], "temprature": 1}, "temprature"),
    # sizes and ranges
    "oversize-prompt": ({"prompt": "x" * (LIMITS["prompt_chars"] + 1)}, "prompt"),
    "oversize-messages": ({"messages": [{"role": "user", "content": "x" * 60}] * 2}, "messages"),
    "too-many-messages": ({"messages": [MSG] * (LIMITS["messages"] + 1)}, "messages"),
    "max-tokens-zero": ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    "max-tokens-negative": ({"prompt": "a", "max_tokens": -5}, "max_tokens"),
    "max-tokens-over-limit": ({"prompt": "a", "max_tokens": LIMITS["max_tokens"] + 1}, "max_tokens"),
    "temperature-negative": ({"prompt": "a", "temperature": -0.1}, "temperature"),
    "temperature-over-2": ({"prompt": "a", "temperature": 2.01}, "temperature"),
    "timeout-zero": ({"prompt": "a", "timeout_s": 0}, "timeout_s"),
    "timeout-over-limit": ({"prompt": "a", "timeout_s": LIMITS["timeout_s"] + 1}, "timeout_s"),
    "metadata-too-big": ({"prompt": "a", "metadata": {"note": "x" * 300}}, "metadata"),
    "params-too-big": ({"prompt": "a", "params": {"stop": ["x" * 50] * 6}}, "params"),
    # images
    "too-many-images": ({"prompt": "a", "images": [PNG_B64] * (LIMITS["images"] + 1)}, "images"),
    "image-not-base64": ({"prompt": "a", "images": ["this is not base64!!"]}, "images"),
    "image-bad-padding": ({"prompt": "a", "images": [PNG_B64[:-3]]}, "images"),
    "image-not-an-image": ({"prompt": "a", "images": [b64(b"just some text, not a picture")]}, "images"),
    "image-empty": ({"prompt": "a", "images": [""]}, "images"),
    "image-too-large": ({"prompt": "a", "images": [b64(PNG + b"\x00" * LIMITS["image_bytes"])]}, "images"),
    "image-data-url-not-an-image": ({"prompt": "a", "images": ["data:image/png;base64," + b64(b"GIF? no")]}, "images"),
}


@pytest.mark.parametrize("body, field", INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
def test_invalid_body_is_400_naming_the_field_and_leaves_nothing(api, policy, redis_db, body, field):
    assert_rejected(post(api, body), 400, field, redis_db)


def test_a_rejected_request_can_be_corrected_and_resubmitted_with_the_same_key(api, policy, redis_db):
    assert_rejected(post(api, {"prompt": "a", "priority": "urgent"}, key="fix-me"), 400, "priority", redis_db)
    resp = post(api, {"prompt": "a", "priority": "high"}, key="fix-me")
    assert resp.status_code == 202, resp.content


# --- the request envelope -------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "   ", "k" * 256], ids=["empty", "blank", "256-chars"])
def test_bad_idempotency_key_header_is_400(api, policy, redis_db, key):
    assert_rejected(post(api, {"prompt": "a"}, key=key), 400, "Idempotency-Key", redis_db)


@pytest.mark.parametrize(
    "raw",
    ['{"prompt": "a"', "prompt=a", '{"prompt": "a",}', "\xff"],
    ids=["truncated", "not-json", "trailing-comma", "garbage"],
)
def test_invalid_json_body_is_400(api, policy, redis_db, raw):
    body = assert_rejected(post(api, raw), 400, "detail", redis_db)
    assert "JSON" in body["detail"]


@pytest.mark.parametrize("raw", ['["a", "b"]', '"a prompt"', "42", "null"])
def test_a_json_body_that_is_not_an_object_is_400(api, policy, redis_db, raw):
    resp = post(api, raw)
    assert resp.status_code == 400, resp.content
    assert resp.json()
    assert_nothing_left(redis_db)


def test_a_non_json_content_type_is_415(api, policy, redis_db):
    resp = post(api, "prompt=a", content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 415
    assert "detail" in resp.json()
    assert_nothing_left(redis_db)


def test_a_body_over_the_request_size_limit_is_413(api, policy, redis_db, settings):
    settings.JOB_LIMITS = {**LIMITS, "prompt_chars": 1_000_000}
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    resp = post(api, {"prompt": "x" * 10_000})
    assert resp.status_code == 413, resp.content
    assert "detail" in resp.json()
    assert_nothing_left(redis_db)


# --- routing refusals ----------------------------------------------------------------------
def test_pinned_unknown_backend_is_400_naming_backend(api, policy, redis_db):
    body = assert_rejected(post(api, {"prompt": "a", "backend": "nowhere"}), 400, "backend", redis_db)
    assert "nowhere" in json.dumps(body)


def test_pinned_disabled_backend_is_422_naming_backend(api, policy, redis_db):
    Backend.objects.create(name="off", kind=BackendKind.DEV, enabled=False)
    body = assert_rejected(post(api, {"prompt": "a", "backend": "off"}), 422, "backend", redis_db)
    assert "disabled" in json.dumps(body)


def test_pinned_backend_without_multimodal_is_422(api, policy, redis_db):
    body = {"prompt": "a", "backend": "dev", "images": [PNG_B64]}
    assert_rejected(post(api, body), 422, "backend", redis_db)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "describe it", "requires_multimodal": True},
        {"prompt": "describe it", "images": [PNG_B64]},
        {"messages": [MSG], "images": ["data:image/png;base64," + PNG_B64]},
    ],
    ids=["requires-multimodal", "images", "images-data-url"],
)
def test_no_eligible_backend_is_503_with_a_message(api, policy, redis_db, body):
    resp = post(api, body)
    data = assert_rejected(resp, 503, "detail", redis_db)
    assert "multimodal" in data["detail"]
    assert data["rejected"] == {"dev": "no multimodal support"}
    assert resp["Retry-After"]


def test_a_job_too_big_for_every_context_window_is_503(api, policy, dev_backend, redis_db):
    dev_backend.max_context_tokens = 50
    dev_backend.save()
    data = assert_rejected(post(api, {"prompt": "a", "max_tokens": 100}), 503, "detail", redis_db)
    assert "context" in data["detail"]


def test_no_active_policy_is_503(api, dev_backend, redis_db):
    RoutingPolicy.objects.create(name="idle", strategy="ordered", params={})
    data = assert_rejected(post(api, {"prompt": "a"}), 503, "detail", redis_db)
    assert "policy" in data["detail"]


# --- what is accepted ------------------------------------------------------------------------
@pytest.fixture
def vision_backend(db):
    return Backend.objects.create(name="vision", kind=BackendKind.DEV, supports_multimodal=True)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "x" * LIMITS["prompt_chars"]},
        {"messages": [{"role": "user", "content": "x" * 50}] * 2},
        {"messages": [MSG] * LIMITS["messages"]},
        {"messages": [{"role": role, "content": "c"} for role in ("system", "user", "assistant")]},
        {"prompt": "a", "max_tokens": 1, "temperature": 0, "timeout_s": 1},
        {"prompt": "a", "max_tokens": LIMITS["max_tokens"], "temperature": 2, "timeout_s": LIMITS["timeout_s"]},
        {"prompt": "a", "priority": "low", "metadata": {"team": "search"}, "params": {"top_p": 0.9}},
        {"prompt": "a", "images": [PNG_B64] * LIMITS["images"]},
        {"prompt": "a", "images": ["data:image/png;base64," + PNG_B64]},
        {"prompt": "a", "requires_multimodal": True},
        {"prompt": "a", "model": "", "backend": "vision"},
    ],
    ids=[
        "prompt-at-limit",
        "messages-at-limit",
        "message-count-at-limit",
        "all-roles",
        "lower-bounds",
        "upper-bounds",
        "options",
        "images-at-limit",
        "image-data-url",
        "requires-multimodal",
        "pinned",
    ],
)
def test_valid_body_at_the_limits_is_accepted(api, policy, vision_backend, body):
    resp = post(api, body)
    assert resp.status_code == 202, resp.content
    assert Job.objects.count() == 1


def test_idempotency_key_of_255_characters_is_accepted(api, policy):
    assert post(api, {"prompt": "a"}, key="k" * 255).status_code == 202


def test_valid_image_job_is_stored_as_plain_base64_and_routed_to_a_multimodal_backend(api, policy, vision_backend):
    resp = post(api, {"prompt": "what is this", "images": ["data:image/png;base64," + PNG_B64]})
    assert resp.status_code == 202, resp.content
    assert resp.json()["backend"] == "vision"
    job = Job.objects.get()
    assert job.image_payloads() == [PNG_B64]
