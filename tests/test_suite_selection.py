"""Which tests the PostgreSQL run keeps: those that reach a database (tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.conftest import uses_database


def test_a_test_with_no_database_fixture_needs_no_database(request):
    assert not uses_database(request.node)


@pytest.mark.django_db
def test_the_django_db_marker_means_the_database(request):
    assert uses_database(request.node)


def test_a_database_fixture_reached_through_another_fixture_means_the_database(request, dev_backend):
    assert uses_database(request.node)  # dev_backend asks for db


def test_starting_worker_processes_means_the_database(request, worker_process):
    assert uses_database(request.node)
