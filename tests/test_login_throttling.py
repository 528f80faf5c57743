"""Password logins are throttled: LOGIN_FAILURE_LIMIT failures for one user name from one address
lock that pair out for LOGIN_COOLOFF_MINUTES, on the admin's login page and the browsable API's alike.

Real logins through the real pages (the test client posts the forms); API tokens and existing
sessions never count as attempts and keep working while a password login is locked.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.conf import settings
from django.test import Client
from django.utils import timezone

from tests.conftest import token_client

PASSWORD = "right-pw-4711"
LOGIN_PAGES = ["/admin/login/", "/api-auth/login/"]


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_superuser("operator", password=PASSWORD)


def login(path: str, password: str, ip: str = "203.0.113.7", username: str = "operator") -> tuple[int, bool]:
    """POST the login form from ``ip``: (status, whether the session is now logged in)."""
    client = Client(REMOTE_ADDR=ip)
    r = client.post(path, {"username": username, "password": password, "next": "/admin/"})
    return r.status_code, "_auth_user_id" in client.session


@pytest.mark.django_db
@pytest.mark.parametrize("path", LOGIN_PAGES)
def test_failures_up_to_the_limit_lock_the_user_out_from_that_address(path, operator):
    limit = settings.AXES_FAILURE_LIMIT
    for _ in range(limit - 1):
        assert login(path, "wrong") == (200, False)  # the form again, with its error
    status, logged_in = login(path, "wrong")
    assert (status, logged_in) == (429, False)
    assert login(path, PASSWORD) == (429, False)  # locked: even the right password is refused
    # The lock is on the pair: the same user from another address, or another user, still logs in.
    assert login(path, PASSWORD, ip="198.51.100.9") == (302, True)


@pytest.mark.django_db
@pytest.mark.parametrize("path", LOGIN_PAGES)
def test_a_success_before_the_limit_logs_in_and_resets_the_count(path, operator):
    limit = settings.AXES_FAILURE_LIMIT
    for _ in range(limit - 1):
        assert login(path, "wrong") == (200, False)
    assert login(path, PASSWORD) == (302, True)
    for _ in range(limit - 1):  # counted from zero again: as many failures as before, no lock
        assert login(path, "wrong") == (200, False)
    assert login(path, PASSWORD) == (302, True)


@pytest.mark.django_db
def test_both_login_pages_share_one_count(operator):
    limit = settings.AXES_FAILURE_LIMIT
    for i in range(limit - 1):
        login(LOGIN_PAGES[i % 2], "wrong")
    assert login(LOGIN_PAGES[(limit - 1) % 2], "wrong")[0] == 429
    for path in LOGIN_PAGES:
        assert login(path, PASSWORD) == (429, False)


@pytest.mark.django_db
def test_the_lock_ends_after_the_cool_off(operator):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        login("/admin/login/", "wrong")
    assert login("/admin/login/", PASSWORD) == (429, False)
    # Move the recorded failures back past the cool-off instead of waiting for it.
    AccessAttempt.objects.update(attempt_time=timezone.now() - settings.AXES_COOLOFF_TIME - timedelta(seconds=1))
    assert login("/admin/login/", PASSWORD) == (302, True)


@pytest.mark.django_db
def test_tokens_and_sessions_still_work_while_the_password_login_is_locked(operator, client):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        login("/api-auth/login/", "wrong", ip="127.0.0.1")
    assert login("/api-auth/login/", PASSWORD, ip="127.0.0.1") == (429, False)
    assert token_client(operator).get("/jobs").status_code == 200  # Authorization: Token …
    client.force_login(operator)
    assert client.get("/admin/").status_code == 200
    assert client.get("/jobs").status_code == 200


@pytest.mark.django_db
def test_failure_limit_comes_from_the_setting(operator, settings):
    settings.AXES_FAILURE_LIMIT = 2
    assert login("/admin/login/", "wrong") == (200, False)
    assert login("/admin/login/", "wrong")[0] == 429


def login_via_proxy(forwarded_for: str, password: str = "wrong") -> int:
    """POST the admin login as it arrives through a local proxy that appended ``forwarded_for``."""
    client = Client(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR=forwarded_for)
    return client.post("/admin/login/", {"username": "operator", "password": password}).status_code


@pytest.mark.django_db
def test_behind_a_trusted_proxy_the_forwarded_client_is_counted(operator, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    for i in range(settings.AXES_FAILURE_LIMIT):
        # The client forges a different left-most entry every time; the proxy's own entry is what counts.
        status = login_via_proxy(f"192.0.2.{i}, 203.0.113.7")
    assert status == 429
    assert login_via_proxy("203.0.113.7", PASSWORD) == 429
    assert login_via_proxy("198.51.100.9", PASSWORD) == 302  # another client behind the same proxy


@pytest.mark.django_db
def test_forwarded_for_is_ignored_unless_a_proxy_is_trusted(operator, settings):
    assert settings.TRUSTED_PROXY_COUNT == 0
    for i in range(settings.AXES_FAILURE_LIMIT):
        status = login_via_proxy(f"192.0.2.{i}")  # a direct client cannot dodge the count by varying it
    assert status == 429
    assert AccessAttempt.objects.get().ip_address == "10.0.0.2"


@pytest.mark.django_db
def test_a_forwarded_value_that_is_no_address_falls_back_to_the_peer(operator, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    assert login_via_proxy("not-an-address") == 200  # counted, not a 500 from the IP column
    assert AccessAttempt.objects.get().ip_address == "10.0.0.2"
