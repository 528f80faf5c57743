"""The /jobs API contract: submit, status, result, list and cancel, and who may see what.

Real Redis, a real database and, where a job must run, a real ``rqworker --burst``
process. Tests are transactional so that the enqueue (``transaction.on_commit``)
happens exactly as it does in production.
"""

from __future__ import annotations

import socket
import uuid
from datetime import datetime

import pytest
from django.conf import settings
from django.db import transaction
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from jobs import fair_queue
from jobs.models import AttemptOutcome, Job, JobAttempt, JobState
from jobs.queueing import TASK
from jobs.status_mirror import cache_key
from routing.models import Backend, BackendKind
from tests.conftest import run_worker_burst, token_client

pytestmark = pytest.mark.django_db(transaction=True)

STATUS_FIELDS = {
    "id",
    "state",
    "priority",
    "backend",
    "policy",
    "attempts",
    "created_at",
    "enqueued_at",
    "started_at",
    "finished_at",
    "error",
    "usage",
    "cost",
    "links",
}


# --- helpers -----------------------------------------------------------------------
def queued_ids() -> dict[str, list[str]]:
    """The RQ job ids waiting on each priority queue (in the fair queue's sub-queues)."""
    return {name: fair_queue.waiting_ids(name) for name in settings.JOB_QUEUES}


def rq_job(job_id: str, redis) -> RQJob:
    return RQJob.fetch(job_id, connection=redis, serializer=JSONSerializer)


def iso(value: str) -> datetime:
    """Parse an ISO 8601 timestamp from the API; it must carry a time zone."""
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, f"{value!r} has no time zone"
    return parsed


def submit(client, body: dict | None = None, path: str = "/jobs", **headers) -> dict:
    resp = client.post(path, body or {"prompt": "hello world"}, format="json", headers=headers)
    assert resp.status_code == 202, resp.content
    return resp.json()


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password="pw-bob-123")


@pytest.fixture
def bob_api(bob):
    return token_client(bob)


# --- POST /jobs ----------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/jobs", "/jobs/"])
@pytest.mark.parametrize(
    "body",
    [{"prompt": "hello world"}, {"messages": [{"role": "user", "content": "hello world"}]}],
    ids=["prompt", "messages"],
)
def test_submit_returns_202_with_status_document_and_location(api, policy, redis_db, path, body):
    resp = api.post(path, body, format="json")

    assert resp.status_code == 202, resp.content
    data = resp.json()
    job_id = data["id"]
    uuid.UUID(job_id)
    assert data["state"] == "queued"
    assert data["priority"] == "normal"
    assert data["backend"] == "dev"
    assert data["policy"] == "default"
    iso(data["created_at"])
    assert data["links"] == {
        "self": f"/jobs/{job_id}",
        "result": f"/jobs/{job_id}/result",
        "cancel": f"/jobs/{job_id}/cancel",
    }
    assert resp["Location"].endswith(f"/jobs/{job_id}")
    assert "Idempotent-Replayed" not in resp
    assert "owner_id" not in data
    assert Job.objects.filter(pk=job_id, state=JobState.QUEUED).count() == 1


@pytest.mark.parametrize("priority", ["high", "normal", "low"])
def test_submit_enqueues_only_the_job_id_on_the_priority_queue(api, policy, redis_db, priority):
    job_id = submit(api, {"prompt": "hi", "priority": priority})["id"]

    assert queued_ids() == {name: ([job_id] if name == priority else []) for name in settings.JOB_QUEUES}
    entry = rq_job(job_id, redis_db)
    assert entry.func_name == TASK
    assert list(entry.args) == [job_id]
    assert entry.kwargs == {}
    row = Job.objects.get(pk=job_id)
    assert (row.priority, row.queue, row.rq_job_id) == (priority, priority, job_id)


def test_nothing_is_enqueued_until_the_transaction_commits(api, policy, redis_db):
    with transaction.atomic():
        job_id = submit(api)["id"]
        assert queued_ids() == {name: [] for name in settings.JOB_QUEUES}
        assert redis_db.get(cache_key(job_id)) is None
    assert queued_ids()["normal"] == [job_id]
    assert redis_db.get(cache_key(job_id)) is not None


def test_a_rolled_back_submission_enqueues_nothing(api, policy, redis_db):
    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        submit(api)
        raise Abort
    assert Job.objects.count() == 0
    assert queued_ids() == {name: [] for name in settings.JOB_QUEUES}


def test_submit_routes_to_a_pinned_backend(api, policy):
    Backend.objects.create(name="other", kind=BackendKind.DEV)
    data = submit(api, {"prompt": "hi", "backend": "other"})
    assert data["backend"] == "other"
    assert Job.objects.get(pk=data["id"]).backend_name == "other"


# --- GET /jobs/<id> --------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", "/"])
def test_status_document_has_the_contract_fields(api, policy, suffix):
    job_id = submit(api)["id"]

    resp = api.get(f"/jobs/{job_id}{suffix}")

    assert resp.status_code == 200, resp.content
    data = resp.json()
    assert set(data) >= STATUS_FIELDS, STATUS_FIELDS - set(data)
    assert "owner_id" not in data
    assert data["id"] == job_id
    assert data["state"] == "queued"
    assert data["priority"] == "normal"
    assert data["backend"] == "dev"
    assert data["policy"] == "default"
    assert data["attempts"] == 0
    assert iso(data["enqueued_at"]) >= iso(data["created_at"])
    assert data["started_at"] is None
    assert data["finished_at"] is None
    assert data["error"] == ""
    assert data["usage"] == {"prompt_tokens": None, "completion_tokens": None}
    assert data["cost"] is None


def test_status_is_served_from_the_redis_mirror_without_touching_the_database(
    api, policy, redis_db, django_assert_num_queries
):
    job_id = submit(api)["id"]
    assert redis_db.get(cache_key(job_id)) is not None

    with django_assert_num_queries(0):  # the token is remembered since the submit; the document is in Redis
        resp = api.get(f"/jobs/{job_id}")
    assert resp.status_code == 200
    assert resp.json()["state"] == "queued"


def test_status_falls_back_to_the_database_after_a_redis_flush_and_refills_the_mirror(
    api, policy, redis_db, django_assert_num_queries
):
    job_id = submit(api)["id"]
    before = api.get(f"/jobs/{job_id}").json()

    assert before["queue_position"] == 1
    redis_db.flushdb()
    resp = api.get(f"/jobs/{job_id}")

    assert resp.status_code == 200
    # The flush took its place in the queue too: no position until the reconciler pushes it again.
    before["queue_position"] = None
    assert resp.json() == before
    assert redis_db.get(cache_key(job_id)) is not None
    with django_assert_num_queries(0):  # refilled: served from Redis again (the token is remembered)
        assert api.get(f"/jobs/{job_id}").json() == before


def test_unknown_job_is_404_json(api, policy):
    resp = api.get(f"/jobs/{uuid.uuid4()}")
    assert resp.status_code == 404
    assert resp["Content-Type"].startswith("application/json")
    assert "detail" in resp.json()


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "12345", "0" * 40])
@pytest.mark.parametrize("endpoint", ["", "/result"])
def test_malformed_job_id_is_404(api, policy, bad_id, endpoint):
    resp = api.get(f"/jobs/{bad_id}{endpoint}")
    assert resp.status_code == 404
    assert "detail" in resp.json()


@pytest.mark.parametrize("flush", [False, True], ids=["from-mirror", "from-database"])
@pytest.mark.parametrize("endpoint", ["", "/result"])
def test_another_users_job_is_404(api, bob_api, policy, redis_db, flush, endpoint):
    job_id = submit(bob_api)["id"]
    if flush:
        redis_db.flushdb()

    resp = api.get(f"/jobs/{job_id}{endpoint}")

    assert resp.status_code == 404
    assert set(resp.json()) == {"detail"}  # nothing about the job leaks
    assert bob_api.get(f"/jobs/{job_id}{endpoint}").status_code in (200, 202)


@pytest.mark.parametrize("flush", [False, True], ids=["from-mirror", "from-database"])
def test_staff_sees_any_users_job(staff_api, api, policy, redis_db, flush):
    job_id = submit(api)["id"]
    if flush:
        redis_db.flushdb()
    resp = staff_api.get(f"/jobs/{job_id}")
    assert resp.status_code == 200
    assert resp.json()["id"] == job_id


# --- GET /jobs/<id>/result + a real worker -------------------------------------------------
@pytest.mark.parametrize("suffix", ["", "/"])
def test_result_is_202_with_state_while_queued(api, policy, suffix):
    job_id = submit(api)["id"]
    resp = api.get(f"/jobs/{job_id}/result{suffix}")
    assert resp.status_code == 202
    body = resp.json()
    assert body["id"] == job_id
    assert body["state"] == "queued"
    assert "output" not in body


@pytest.mark.slow
def test_result_after_a_worker_run_has_output_usage_backend_and_latency(api, policy):
    prompt_job = submit(api, {"prompt": "the quick brown fox"})["id"]
    chat_job = submit(
        api,
        {
            "messages": [
                {"role": "system", "content": "be terse"},
                {"role": "user", "content": "first question"},
                {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": "second question here"},
            ],
            "priority": "high",
        },
    )["id"]

    run_worker_burst()

    resp = api.get(f"/jobs/{prompt_job}/result")
    assert resp.status_code == 200, resp.content
    result = resp.json()
    assert result["id"] == prompt_job
    assert result["state"] == "succeeded"
    assert result["output"] == "the quick brown fox"
    assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 4}
    assert result["backend"] == "dev"
    assert isinstance(result["latency_ms"], int) and result["latency_ms"] >= 0
    assert result["cost"] == 0

    chat = api.get(f"/jobs/{chat_job}/result").json()
    assert chat["state"] == "succeeded"
    assert chat["output"] == "second question here"  # the dev backend echoes the last user message

    status = api.get(f"/jobs/{prompt_job}").json()
    assert status["state"] == "succeeded"
    assert status["attempts"] == 1
    assert iso(status["created_at"]) <= iso(status["started_at"]) <= iso(status["finished_at"])
    assert status["usage"] == {"prompt_tokens": 4, "completion_tokens": 4}
    assert status["error"] == ""

    job = Job.objects.get(pk=prompt_job)
    assert job.created_at <= job.enqueued_at <= job.started_at <= job.finished_at
    assert job.worker.startswith(f"{socket.gethostname()}.")
    assert job.attempts.get().outcome == AttemptOutcome.SUCCEEDED

    # A finished job cannot be canceled.
    resp = api.post(f"/jobs/{prompt_job}/cancel")
    assert resp.status_code == 409
    assert resp.json()["state"] == "succeeded"


# --- GET /jobs ------------------------------------------------------------------------
def _page_ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.content
    return [job["id"] for job in resp.json()["results"]]


def test_list_is_cursor_paginated_newest_first(api, policy):
    created = [submit(api, {"prompt": f"job {i}"})["id"] for i in range(5)]

    seen: list[str] = []
    resp = api.get("/jobs", {"page_size": 2})
    pages = 0
    while True:
        pages += 1
        ids = _page_ids(resp)
        assert len(ids) <= 2
        seen += ids
        body = resp.json()
        assert "owner_id" not in str(body["results"])
        if not body["next"]:
            break
        assert "cursor=" in body["next"]
        resp = api.get(body["next"])
    assert pages == 3
    assert seen == list(reversed(created))


def test_list_without_page_size_returns_a_page(api, policy):
    job_id = submit(api)["id"]
    resp = api.get("/jobs")
    assert resp.status_code == 200, resp.content
    assert [job["id"] for job in resp.json()["results"]] == [job_id]


def test_list_accepts_a_trailing_slash(api, policy):
    job_id = submit(api)["id"]
    assert _page_ids(api.get("/jobs/", {"page_size": 10})) == [job_id]


def test_list_filters_by_state_priority_and_backend(api, policy):
    Backend.objects.create(name="other", kind=BackendKind.DEV)
    high = submit(api, {"prompt": "a", "priority": "high"})["id"]
    low = submit(api, {"prompt": "b", "priority": "low"})["id"]
    pinned = submit(api, {"prompt": "c", "backend": "other"})["id"]
    assert api.post(f"/jobs/{low}/cancel").status_code == 200

    def ids(**params):
        return set(_page_ids(api.get("/jobs", {"page_size": 50, **params})))

    assert ids() == {high, low, pinned}
    assert ids(state="canceled") == {low}
    assert ids(state="queued") == {high, pinned}
    assert ids(priority="high") == {high}
    assert ids(priority="normal") == {pinned}
    assert ids(backend="other") == {pinned}
    assert ids(backend="dev") == {high, low}
    assert ids(backend="dev", state="queued") == {high}
    assert ids(backend="nope") == set()


@pytest.mark.parametrize("param, value", [("state", "done"), ("priority", "urgent"), ("state", "QUEUED")])
def test_list_rejects_an_invalid_filter_value_naming_the_parameter(api, policy, param, value):
    resp = api.get("/jobs", {param: value, "page_size": 10})
    assert resp.status_code == 400
    assert param in resp.json()


def test_users_list_only_their_own_jobs_and_staff_lists_all(api, bob_api, staff_api, policy):
    mine = submit(api)["id"]
    theirs = submit(bob_api)["id"]

    assert _page_ids(api.get("/jobs", {"page_size": 50})) == [mine]
    assert _page_ids(bob_api.get("/jobs", {"page_size": 50})) == [theirs]
    assert set(_page_ids(staff_api.get("/jobs", {"page_size": 50}))) == {mine, theirs}


# --- POST /jobs/<id>/cancel -------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", "/"])
def test_cancel_a_queued_job_returns_200_canceled(api, policy, suffix):
    job_id = submit(api)["id"]

    resp = api.post(f"/jobs/{job_id}/cancel{suffix}")

    assert resp.status_code == 200, resp.content
    body = resp.json()
    assert body["id"] == job_id
    assert body["state"] == "canceled"
    iso(body["finished_at"])
    assert "owner_id" not in body
    # The mirror follows at once: status and result both say canceled.
    assert api.get(f"/jobs/{job_id}").json()["state"] == "canceled"
    result = api.get(f"/jobs/{job_id}/result")
    assert result.status_code == 200
    assert result.json()["state"] == "canceled"


@pytest.mark.slow
def test_worker_skips_a_canceled_job(api, policy):
    job_id = submit(api, {"prompt": "never run me"})["id"]
    assert api.post(f"/jobs/{job_id}/cancel").status_code == 200

    run_worker_burst()

    status = api.get(f"/jobs/{job_id}").json()
    assert status["state"] == "canceled"
    assert status["attempts"] == 0
    assert status["started_at"] is None
    row = Job.objects.get(pk=job_id)
    assert (row.state, row.attempt_count, row.output) == (JobState.CANCELED, 0, "")
    assert not JobAttempt.objects.filter(job=row).exists()
    assert queued_ids() == {name: [] for name in settings.JOB_QUEUES}


def test_cancel_of_a_terminal_job_is_409(api, policy):
    job_id = submit(api)["id"]
    assert api.post(f"/jobs/{job_id}/cancel").status_code == 200

    resp = api.post(f"/jobs/{job_id}/cancel")

    assert resp.status_code == 409
    assert resp.json()["state"] == "canceled"
    assert "detail" in resp.json()


def test_cancel_of_another_users_job_is_404_and_leaves_it_queued(api, bob_api, policy):
    job_id = submit(bob_api)["id"]
    assert api.post(f"/jobs/{job_id}/cancel").status_code == 404
    assert Job.objects.get(pk=job_id).state == JobState.QUEUED


@pytest.mark.parametrize("job_id", ["not-a-uuid", str(uuid.UUID(int=0))])
def test_cancel_of_an_unknown_or_malformed_id_is_404(api, policy, job_id):
    resp = api.post(f"/jobs/{job_id}/cancel")
    assert resp.status_code == 404
    assert "detail" in resp.json()


def test_staff_can_cancel_any_users_job(api, staff_api, policy):
    job_id = submit(api)["id"]
    assert staff_api.post(f"/jobs/{job_id}/cancel").status_code == 200
    assert Job.objects.get(pk=job_id).state == JobState.CANCELED


# --- authentication and health ------------------------------------------------------------
@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/jobs"),
        ("post", "/jobs"),
        ("post", "/jobs/"),
        ("get", f"/jobs/{uuid.UUID(int=1)}"),
        ("get", f"/jobs/{uuid.UUID(int=1)}/result"),
        ("post", f"/jobs/{uuid.UUID(int=1)}/cancel"),
        ("get", "/backends"),
        ("post", "/backends"),
        ("get", "/policies"),
        ("post", "/policies"),
    ],
)
def test_anonymous_requests_are_refused(client, policy, method, path):
    body = {"prompt": "x"} if method == "post" else None
    resp = getattr(client, method)(path, body, content_type="application/json")
    assert resp.status_code in (401, 403)
    assert Job.objects.count() == 0


def test_a_bad_token_is_401(policy):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert client.post("/jobs", {"prompt": "x"}, format="json").status_code == 401
    assert Job.objects.count() == 0


@pytest.mark.parametrize("path, status", [("/healthz", "ok"), ("/readyz", "ready"), ("/healthz/", "ok")])
def test_health_endpoints_need_no_auth(client, path, status):
    resp = client.get(path)
    assert resp.status_code == 200
    assert resp.json()["status"] == status


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/", "/jobs", "/backends", "/policies"])
def test_browsable_api_pages_render_for_a_logged_in_operator(client, staff, policy, path):
    client.force_login(staff)
    r = client.get(path, HTTP_ACCEPT="text/html")
    assert r.status_code == 200 and r["Content-Type"].startswith("text/html")


@pytest.mark.django_db
def test_openapi_schema_describes_the_job_endpoints(client, staff):
    client.force_login(staff)
    r = client.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert r.status_code == 200
    assert b"/jobs/{job_id}/result" in r.content and b"Idempotency-Key" in r.content
