"""API tokens remembered per process for AUTH_TOKEN_CACHE_MS: fewer queries, revocation within that window."""

from __future__ import annotations

import pytest
from django.test import override_settings
from rest_framework.authtoken.models import Token

from orchestrator_site import auth
from tests.conftest import token_client

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def empty_cache():
    auth.forget_all()
    yield
    auth.forget_all()


def test_a_remembered_token_skips_the_query(user, django_assert_num_queries):
    client = token_client(user)
    assert client.get("/jobs").status_code == 200  # first use: the token query
    with django_assert_num_queries(1):  # only the jobs page query, no token lookup
        r = client.get("/jobs")
    assert r.status_code == 200 and r.wsgi_request.user.pk == user.pk


def test_a_bad_token_is_refused_and_not_remembered(user):
    client = token_client(user)
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert client.get("/jobs").status_code == 401
    assert client.get("/jobs").status_code == 401


@override_settings(AUTH_TOKEN_CACHE_S=0.2)
def test_a_deleted_token_stops_working_within_the_window(user):
    import time

    client = token_client(user)
    assert client.get("/jobs").status_code == 200
    Token.objects.filter(user=user).delete()
    time.sleep(0.25)
    assert client.get("/jobs").status_code == 401


@override_settings(AUTH_TOKEN_CACHE_S=0)
def test_zero_turns_the_cache_off(user):
    client = token_client(user)
    client.get("/jobs")
    Token.objects.filter(user=user).delete()
    assert client.get("/jobs").status_code == 401


def test_each_request_gets_its_own_user_object(user):
    client = token_client(user)
    first = client.get("/jobs").wsgi_request.user
    second = client.get("/jobs").wsgi_request.user
    assert first.pk == second.pk and first is not second
