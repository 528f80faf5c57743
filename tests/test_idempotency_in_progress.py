"""A repeated ``Idempotency-Key`` while the first request is still being served: 409, nothing made.

The first request claims the key in Redis and is then held inside the submit path: the test holds
the database's write lock on the jobs table from another connection (as a slow disk or a long
migration would), so its insert waits. A repeat meanwhile waits for the first to commit, gives up
after ``idempotency.WAIT_S`` with a 409, and leaves the first request's claim alone; once the first
commits, the same repeat is answered with its job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from django.db import connection, transaction

from jobs import idempotency
from jobs.models import Job
from orchestrator_site.redis import redis_client
from tests.conftest import token_client

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"prompt": "book the room", "priority": "high"}
KEY = "booking-42"


@contextmanager
def job_inserts_held() -> Iterator[None]:
    """Hold the write lock on the jobs table from a connection of another thread until the block ends."""
    held, release = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    def hold() -> None:
        try:
            # SQLite: the project opens every transaction with BEGIN IMMEDIATE, which takes the
            # database's one write lock. PostgreSQL: a lock that blocks INSERT but not reads.
            with transaction.atomic():
                if connection.vendor == "postgresql":
                    with connection.cursor() as cursor:
                        cursor.execute(f"LOCK TABLE {Job._meta.db_table} IN EXCLUSIVE MODE")
                held.set()
                release.wait(60)
        except BaseException as exc:  # surfaced in the test's thread
            failure.append(exc)
            held.set()
        finally:
            connection.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert held.wait(30)
    assert not failure, failure
    try:
        yield
    finally:
        release.set()
        thread.join(30)


def post(client, key: str = KEY):
    try:
        return client.post("/jobs", BODY, format="json", headers={"Idempotency-Key": key})
    finally:
        if threading.current_thread() is not threading.main_thread():
            connection.close()


def claim_value(user) -> bytes | None:
    return redis_client().get(idempotency.redis_key(user.pk, KEY))


def test_a_repeat_while_the_first_request_is_still_served_is_409_and_the_key_stays_the_firsts(
    api, user, policy, monkeypatch
):
    monkeypatch.setattr(idempotency, "WAIT_S", 0.3)  # how long a repeat waits for the first (10 s by default)
    pending = idempotency.fingerprint(BODY).encode()
    with ThreadPoolExecutor(1) as pool:
        with job_inserts_held():
            first = pool.submit(post, token_client(user))
            deadline = time.monotonic() + 30
            while claim_value(user) != pending:  # the first request claimed the key and waits to insert
                assert time.monotonic() < deadline and not first.done(), "the first request did not claim the key"
                time.sleep(0.01)

            repeat = post(api)
            assert repeat.status_code == 409, repeat.content
            assert "still being processed" in repeat.json()["detail"]
            assert not first.done()  # still inside the submit path
            assert claim_value(user) == pending  # the 409 did not release the first request's claim
            assert Job.objects.count() == 0
        first_response = first.result(timeout=60)

    assert first_response.status_code == 202, first_response.content
    job_id = first_response.json()["id"]
    assert claim_value(user) == f"{pending.decode()}:{job_id}".encode()
    again = post(api)
    assert again.status_code == 200 and again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == job_id and Job.objects.count() == 1
