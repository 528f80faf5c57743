"""Tenants, keys and clean per-process caches (remembered keys, tokens and memberships)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.contrib.auth.models import Permission
from rest_framework.test import APIClient

from orchestrator_site import auth
from tenants import identity
from tenants.models import ApiKey, Tenant


@pytest.fixture(autouse=True)
def empty_caches() -> Iterator[None]:
    auth.forget_all()
    identity.forget()
    yield
    auth.forget_all()
    identity.forget()


@pytest.fixture
def tenant(db) -> Tenant:
    return Tenant.objects.create(name="acme", description="Acme Corp")


def key_client(raw: str, keyword: str = "Bearer") -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"{keyword} {raw}")
    return client


@pytest.fixture
def issued(tenant) -> tuple[ApiKey, str]:
    """A live key of ``tenant``: (row, raw key)."""
    return ApiKey.issue(tenant, "ci")


def staff_with(django_user_model, username: str, codenames: list[str]):
    user = django_user_model.objects.create_user(username, password=f"pw-{username}-123", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="tenants", codename__in=codenames))
    return user
