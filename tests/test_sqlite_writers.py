"""A process's threads take turns to write to SQLite (orchestrator_site/sqlite): the turn is always given back."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction
from django.db.models import F

from jobs.models import Job
from orchestrator_site.sqlite import base as sqlite_base
from tests.factories import make_job

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "sqlite", reason="the SQLite writers' lock; PostgreSQL has none"),
]


def lock_is_free() -> bool:
    if sqlite_base._WRITERS.acquire(timeout=0):
        sqlite_base._WRITERS.release()
        return True
    return False


def test_the_turn_is_held_for_the_transaction_and_given_back_on_commit_and_rollback():
    job = make_job()
    with transaction.atomic():
        Job.objects.filter(pk=job.pk).update(prompt="one")
        assert not lock_is_free()
    assert lock_is_free()
    with pytest.raises(RuntimeError), transaction.atomic():
        Job.objects.filter(pk=job.pk).update(prompt="two")
        raise RuntimeError("rolled back")
    assert lock_is_free()
    assert Job.objects.get(pk=job.pk).prompt == "one"


def test_writers_on_many_threads_all_commit():
    job = make_job()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(20):
                with transaction.atomic():
                    Job.objects.filter(pk=job.pk).update(attempt_count=F("attempt_count") + 1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert Job.objects.get(pk=job.pk).attempt_count == 8 * 20
    assert lock_is_free()
