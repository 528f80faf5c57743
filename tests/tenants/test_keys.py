"""Tenant API keys: issued once and stored hashed, listed without the key, revoked (401 from the next
request); ``Bearer`` with a key acts as the tenant's service user, ``Bearer`` and ``Token`` with a
user token as that user; a disabled tenant is 403 naming it; last use written at most once a minute."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone
from rest_framework.authtoken.models import Token

from audit.models import AuditEntry
from jobs.models import Job
from tenants import keys
from tenants.models import KEY_PREFIX, ApiKey, Membership, hash_key
from tests.conftest import token_client
from tests.tenants.conftest import key_client

pytestmark = pytest.mark.django_db


def test_a_key_is_shown_once_and_stored_hashed(staff_api, tenant):
    r = staff_api.post(f"/tenants/{tenant.pk}/keys", {"name": "ci"}, format="json")
    assert r.status_code == 201, r.content
    body = r.json()
    assert set(body) == {"id", "name", "key", "created_at"}
    raw = body["key"]
    assert raw.startswith(KEY_PREFIX) and len(raw) > 40

    key = ApiKey.objects.get(pk=body["id"])
    assert key.key_hash == hash_key(raw) and raw not in key.key_hash
    assert raw.startswith(key.prefix)

    listed = staff_api.get(f"/tenants/{tenant.pk}/keys").json()
    assert listed == [
        {
            "id": key.pk,
            "name": "ci",
            "prefix": key.prefix,
            "created_at": body["created_at"],
            "last_used_at": None,
            "revoked_at": None,
        }
    ]
    assert raw not in str(staff_api.get(f"/tenants/{tenant.pk}").content)
    entry = AuditEntry.objects.get(action="issue_key")
    assert raw not in str(entry.changes) and entry.changes["prefix"] == [None, key.prefix]


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": 3}, {"name": "x" * 101}, {"name": ["a"]}])
def test_a_bad_key_request_is_400_and_issues_nothing(staff_api, tenant, body):
    r = staff_api.post(f"/tenants/{tenant.pk}/keys", body, format="json")
    assert r.status_code == 400 and "name" in r.json()
    assert not ApiKey.objects.exists()


def test_revoking_a_key_of_another_tenant_or_an_unknown_one_is_404(staff_api, tenant, issued):
    from tenants.models import Tenant

    other = Tenant.objects.create(name="globex")
    assert staff_api.delete(f"/tenants/{other.pk}/keys/{issued[0].pk}").status_code == 404
    assert staff_api.delete(f"/tenants/{tenant.pk}/keys/999999").status_code == 404
    assert staff_api.delete(f"/tenants/{tenant.pk}/keys/abc").status_code == 404
    assert ApiKey.objects.get().revoked_at is None


@pytest.mark.django_db(transaction=True)
def test_a_revoked_key_is_401_from_the_next_request(staff_api, tenant, issued, policy):
    key, raw = issued
    client = key_client(raw)
    assert client.get("/jobs").status_code == 200  # remembered by this process now

    assert staff_api.delete(f"/tenants/{tenant.pk}/keys/{key.pk}").status_code == 204
    key.refresh_from_db()
    assert key.revoked_at is not None

    r = client.get("/jobs")
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert client.post("/jobs", {"prompt": "hi"}, format="json").status_code == 401
    assert staff_api.delete(f"/tenants/{tenant.pk}/keys/{key.pk}").status_code == 204  # again: a no-op
    assert AuditEntry.objects.filter(action="revoke_key").count() == 1
    assert staff_api.get(f"/tenants/{tenant.pk}/keys").json()[0]["revoked_at"] is not None


def test_an_unknown_key_is_401(tenant, issued):
    assert key_client(KEY_PREFIX + "not-a-key").get("/jobs").status_code == 401
    assert key_client(issued[1] + "x").get("/jobs").status_code == 401


def test_a_key_submits_a_job_owned_by_the_tenants_service_user(tenant, issued, policy):
    client = key_client(issued[1])
    r = client.post("/jobs", {"prompt": "hello"}, format="json")
    assert r.status_code == 202, r.content
    job = Job.objects.get(pk=r.json()["id"])
    assert job.created_by.username == f"tenant:{tenant.pk}"
    assert not job.created_by.has_usable_password()
    assert r.wsgi_request.auth.tenant == tenant  # what tenants.identity reads
    # The key (and every key of the tenant) sees its jobs; others do not.
    assert client.get(f"/jobs/{job.pk}").status_code == 200
    other = ApiKey.issue(tenant, "second")[1]
    assert key_client(other).get(f"/jobs/{job.pk}").status_code == 200
    assert [j["id"] for j in client.get("/jobs").json()["results"]] == [str(job.pk)]


def test_the_token_keyword_takes_a_key_too(tenant, issued, policy):
    assert key_client(issued[1], keyword="Token").post("/jobs", {"prompt": "hi"}, format="json").status_code == 202


def test_jobs_of_a_tenants_key_are_not_a_members_own(tenant, issued, policy, user):
    """Visibility stays by owner: a member sees their own jobs, not the ones its tenant's keys made."""
    Membership.objects.create(user=user, tenant=tenant)
    job_id = key_client(issued[1]).post("/jobs", {"prompt": "hi"}, format="json").json()["id"]
    assert token_client(user).get(f"/jobs/{job_id}").status_code == 404


def test_a_disabled_tenants_key_is_403_naming_the_tenant(tenant, issued, policy):
    tenant.enabled = False
    tenant.save()
    r = key_client(issued[1]).post("/jobs", {"prompt": "hi"}, format="json")
    assert r.status_code == 403
    assert "acme" in r.json()["detail"] and "disabled" in r.json()["detail"]
    assert not Job.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_disabling_a_tenant_through_the_api_refuses_its_remembered_key_at_once(staff_api, tenant, issued):
    client = key_client(issued[1])
    assert client.get("/jobs").status_code == 200
    assert staff_api.patch(f"/tenants/{tenant.pk}", {"enabled": False}, format="json").status_code == 200
    assert client.get("/jobs").status_code == 403


def test_bearer_and_token_both_take_a_user_token(user, policy):
    token = Token.objects.create(user=user).key
    for keyword in ("Bearer", "Token"):
        r = key_client(token, keyword=keyword).post("/jobs", {"prompt": "hi"}, format="json")
        assert r.status_code == 202, (keyword, r.content)
        assert Job.objects.get(pk=r.json()["id"]).created_by == user
    assert key_client("0" * 40).get("/jobs").status_code == 401


def test_a_remembered_key_costs_no_query(tenant, issued, django_assert_num_queries):
    client = key_client(issued[1])
    assert client.get("/jobs").status_code == 200  # first use: the key, the service user, last_used_at
    with django_assert_num_queries(1):  # only the jobs page
        assert client.get("/jobs").status_code == 200


def test_last_used_at_is_written_at_most_once_a_minute(tenant, issued):
    key, raw = issued
    client = key_client(raw)
    assert key.last_used_at is None
    client.get("/jobs")
    first = ApiKey.objects.get(pk=key.pk).last_used_at
    assert first is not None and timezone.now() - first < timedelta(seconds=5)

    client.get("/jobs")
    assert ApiKey.objects.get(pk=key.pk).last_used_at == first

    long_ago = timezone.now() - timedelta(seconds=keys.LAST_USED_EVERY_S + 5)
    ApiKey.objects.filter(pk=key.pk).update(last_used_at=long_ago)
    keys.forget()
    client.get("/jobs")
    assert ApiKey.objects.get(pk=key.pk).last_used_at > long_ago


@override_settings(AUTH_TOKEN_CACHE_S=0)
def test_without_the_cache_each_request_reads_the_key(tenant, issued):
    key, raw = issued
    client = key_client(raw)
    assert client.get("/jobs").status_code == 200
    ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())  # as another process would
    assert client.get("/jobs").status_code == 401


def test_each_tenant_has_one_service_user(tenant, issued):
    other = ApiKey.issue(tenant, "second")[1]
    first = key_client(issued[1]).get("/jobs").wsgi_request.user
    second = key_client(other).get("/jobs").wsgi_request.user
    assert first.pk == second.pk and first is not second
