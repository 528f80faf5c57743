"""``Idempotency-Key`` on ``POST /jobs``: one key + one body is one job, even under concurrency,
after Redis lost the key, and per user; an expired key may be reused; a failure releases the key."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from django.conf import settings as django_settings
from django.utils import timezone
from rest_framework.authtoken.models import Token

from jobs import fair_queue
from jobs.models import Job
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.conftest import token_client

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"prompt": "summarise the ticket", "priority": "high", "metadata": {"ticket": 7}}


def post(client, body, key: str | None, **kwargs):
    headers = {"Idempotency-Key": key} if key is not None else {}
    if isinstance(body, str):
        return client.post("/jobs", body, content_type="application/json", headers=headers)
    return client.post("/jobs", body, format="json", headers=headers)


def queue_sizes() -> dict[str, int]:
    return fair_queue.depths(django_settings.JOB_QUEUES)


def idem_keys(redis) -> list[bytes]:
    return list(redis.scan_iter("llmo:idem:*"))


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="pw-bob-123")


# --- replay and conflicts ---------------------------------------------------------------------
def test_duplicate_key_returns_original_job(api, policy, redis_db):
    first = post(api, BODY, "order-7")
    assert first.status_code == 202, first.content
    assert "Idempotent-Replayed" not in first

    for _ in range(2):
        again = post(api, BODY, "order-7")
        assert again.status_code == 200, again.content
        assert again["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == first.json()["id"]
        assert again["Location"] == first["Location"]
        for field in ("priority", "backend", "policy", "created_at", "links"):
            assert again.json()[field] == first.json()[field]
        assert "owner_id" not in again.json()

    assert Job.objects.count() == 1
    assert queue_sizes() == {"high": 1, "normal": 0, "low": 0}


def test_same_key_with_a_different_body_is_422_and_keeps_the_original(api, policy, redis_db):
    original = post(api, BODY, "order-7").json()["id"]

    resp = post(api, {**BODY, "prompt": "something else"}, "order-7")

    assert resp.status_code == 422, resp.content
    assert "Idempotency-Key" in resp.json()
    assert Job.objects.count() == 1
    assert queue_sizes()["high"] == 1
    replay = post(api, BODY, "order-7")
    assert (replay.status_code, replay.json()["id"]) == (200, original)


def test_a_replay_reports_the_jobs_current_state(api, policy):
    job_id = post(api, BODY, "k").json()["id"]
    assert api.post(f"/jobs/{job_id}/cancel").status_code == 200
    replay = post(api, BODY, "k")
    assert replay.status_code == 200
    assert (replay.json()["id"], replay.json()["state"]) == (job_id, "canceled")


def test_key_order_and_spacing_in_the_json_body_do_not_matter(api, policy):
    compact = '{"prompt":"hi","priority":"low","metadata":{"a":1,"b":[1,2]}}'
    reordered = '{ "metadata" : { "b" : [ 1, 2 ], "a" : 1 },\n  "priority": "low",  "prompt": "hi" }'
    first = post(api, compact, "fmt")
    second = post(api, reordered, "fmt")
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    assert Job.objects.count() == 1


def test_keys_are_per_user(api, bob, policy, redis_db):
    bob_api = token_client(bob)
    mine = post(api, BODY, "shared-key")
    theirs = post(bob_api, BODY, "shared-key")
    assert (mine.status_code, theirs.status_code) == (202, 202)
    assert mine.json()["id"] != theirs.json()["id"]
    assert Job.objects.count() == 2
    assert len(idem_keys(redis_db)) == 2
    # And each user's replay finds their own job.
    assert post(bob_api, BODY, "shared-key").json()["id"] == theirs.json()["id"]
    assert post(api, BODY, "shared-key").json()["id"] == mine.json()["id"]


def test_requests_without_a_key_are_never_deduplicated(api, policy, redis_db):
    ids = {post(api, BODY, None).json()["id"] for _ in range(3)}
    assert len(ids) == 3
    assert idem_keys(redis_db) == []


# --- the database backstop ----------------------------------------------------------------------
def test_after_a_redis_flush_the_same_key_and_body_return_the_original_job(api, policy, redis_db):
    original = post(api, BODY, "survivor").json()["id"]
    redis_db.flushdb()

    resp = post(api, BODY, "survivor")

    assert resp.status_code == 200, resp.content
    assert resp["Idempotent-Replayed"] == "true"
    assert resp.json()["id"] == original
    assert Job.objects.count() == 1
    # The answer is back in Redis: the next replay does not need the database backstop.
    assert len(idem_keys(redis_db)) == 1
    assert post(api, BODY, "survivor").json()["id"] == original


def test_after_a_redis_flush_a_different_body_is_still_422(api, policy, redis_db):
    post(api, BODY, "survivor")
    redis_db.flushdb()

    resp = post(api, {**BODY, "priority": "low"}, "survivor")

    assert resp.status_code == 422, resp.content
    assert "Idempotency-Key" in resp.json()
    assert Job.objects.count() == 1
    assert idem_keys(redis_db) == []
    assert post(api, BODY, "survivor").status_code == 200


# --- expiry -------------------------------------------------------------------------------------
@pytest.mark.parametrize("same_body", [True, False], ids=["same-body", "different-body"])
def test_an_expired_key_may_be_reused_and_creates_a_new_job(api, policy, redis_db, same_body):
    old = post(api, BODY, "daily-report").json()["id"]
    Job.objects.filter(pk=old).update(idempotency_expires_at=timezone.now() - timedelta(seconds=1))
    redis_db.flushdb()

    resp = post(api, BODY if same_body else {**BODY, "prompt": "today"}, "daily-report")

    assert resp.status_code == 202, resp.content
    new = resp.json()["id"]
    assert new != old
    assert Job.objects.count() == 2
    assert Job.objects.get(pk=new).idempotency_key == "daily-report"
    assert Job.objects.get(pk=old).idempotency_key != "daily-report"
    # The key now belongs to the new job.
    assert post(api, BODY if same_body else {**BODY, "prompt": "today"}, "daily-report").json()["id"] == new


def test_a_key_past_its_ttl_creates_a_new_job(api, policy, settings):
    settings.IDEMPOTENCY_TTL_S = 1
    old = post(api, BODY, "short-lived").json()["id"]
    assert post(api, BODY, "short-lived").json()["id"] == old

    time.sleep(1.2)
    resp = post(api, BODY, "short-lived")

    assert resp.status_code == 202, resp.content
    assert resp.json()["id"] != old
    assert Job.objects.count() == 2


# --- a failed request releases its key ------------------------------------------------------------
def test_a_request_that_found_no_backend_releases_its_key(api, policy, redis_db):
    body = {"prompt": "what is in the picture", "requires_multimodal": True}
    assert post(api, body, "vision-1").status_code == 503
    assert idem_keys(redis_db) == []

    Backend.objects.create(name="vision", kind=BackendKind.DEV, supports_multimodal=True)
    resp = post(api, body, "vision-1")

    assert resp.status_code == 202, resp.content
    assert resp.json()["backend"] == "vision"
    assert Job.objects.count() == 1


def test_a_request_refused_for_no_active_policy_releases_its_key(api, dev_backend, redis_db):
    idle = RoutingPolicy.objects.create(name="idle", strategy="ordered", params={})
    assert post(api, BODY, "early").status_code == 503
    policies.activate(idle)
    assert post(api, BODY, "early").status_code == 202


def test_a_request_pinned_to_an_unknown_backend_releases_its_key(api, policy, redis_db):
    body = {"prompt": "hi", "backend": "later"}
    assert post(api, body, "pin").status_code == 400
    assert idem_keys(redis_db) == []
    Backend.objects.create(name="later", kind=BackendKind.DEV)
    assert post(api, body, "pin").status_code == 202


# --- races across real web processes -----------------------------------------------------------
def fire(base: str, token: str, requests: list[tuple[dict, str]]) -> list[httpx.Response]:
    """Send all requests at once from as many threads (a barrier lines them up).

    Every web process is warmed first (URLconf, DB connection, routing snapshot) with
    requests that route but create nothing, so the first real requests overlap inside
    the claim window instead of being spread out by each process's first-request cost.
    """
    barrier = threading.Barrier(len(requests))
    headers = {"Authorization": f"Token {token}"}
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    with httpx.Client(base_url=base, timeout=60, limits=limits) as http:
        warm = {"prompt": "warm-up", "backend": "no-such-backend"}  # routed, then refused: 400
        with ThreadPoolExecutor(12) as pool:
            assert set(pool.map(lambda _: http.post("/jobs", json=warm, headers=headers).status_code, range(24))) == {
                400
            }

        def one(item: tuple[dict, str]) -> httpx.Response:
            body, key = item
            barrier.wait()
            return http.post("/jobs", json=body, headers={**headers, "Idempotency-Key": key})

        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(one, requests))


@pytest.mark.slow
def test_concurrent_duplicates_create_exactly_one_job(gunicorn_server, user, policy, redis_db):
    base = gunicorn_server(workers=3)
    token = Token.objects.create(user=user).key

    responses = fire(base, token, [(BODY, "race-1")] * 40)

    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 202}, [(r.status_code, r.text) for r in responses if r.status_code not in (200, 202)]
    assert codes.count(202) == 1
    assert len({r.json()["id"] for r in responses}) == 1
    assert all(r.headers.get("Idempotent-Replayed") == "true" for r in responses if r.status_code == 200)
    assert Job.objects.count() == 1
    job_id = Job.objects.get().pk
    assert fair_queue.waiting_ids("high") == [str(job_id)]
    assert queue_sizes() == {"high": 1, "normal": 0, "low": 0}


@pytest.mark.slow
def test_concurrent_requests_with_distinct_keys_create_one_job_each(gunicorn_server, user, policy, redis_db):
    base = gunicorn_server(workers=3)
    token = Token.objects.create(user=user).key

    responses = fire(base, token, [({**BODY, "metadata": {"n": i}}, f"distinct-{i}") for i in range(30)])

    assert [r.status_code for r in responses] == [202] * 30, [r.text for r in responses if r.status_code != 202]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 30
    assert set(map(str, Job.objects.values_list("pk", flat=True))) == ids
    assert set(fair_queue.waiting_ids("high")) == ids
    assert len(idem_keys(redis_db)) == 30


@pytest.mark.slow
def test_concurrent_same_key_with_two_bodies_creates_one_job_and_rejects_the_other_body(
    gunicorn_server, user, policy, redis_db
):
    base = gunicorn_server(workers=3)
    token = Token.objects.create(user=user).key
    other = {**BODY, "prompt": "a different request"}
    requests = [(BODY, "contested"), (other, "contested")] * 15

    responses = fire(base, token, requests)

    assert [r.status_code for r in responses].count(202) == 1
    winner = next(r for r in responses if r.status_code == 202)
    winning_body = requests[responses.index(winner)][0]
    for (body, _), resp in zip(requests, responses, strict=True):
        if body == winning_body:
            assert resp.status_code in (200, 202), resp.text
            assert resp.json()["id"] == winner.json()["id"]
        else:
            assert resp.status_code == 422, resp.text
    assert Job.objects.count() == 1
    assert queue_sizes() == {"high": 1, "normal": 0, "low": 0}
