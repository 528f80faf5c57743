"""The tenant admin: pages render, members are added through the inline (one tenant per user), keys
are issued with the key shown once and revoked by an action that needs the change permission; the
job list shows and filters by tenant."""

from __future__ import annotations

import pytest
from django.urls import reverse

from audit.models import AuditEntry
from tenants import identity
from tenants.models import ApiKey, Membership, Tenant, hash_key
from tests.factories import make_job
from tests.tenants.conftest import key_client, staff_with

pytestmark = pytest.mark.django_db


def post_action(client, changelist: str, action: str, rows):
    return client.post(
        reverse(changelist),
        {"action": action, "select_across": "0", "index": "0", "_selected_action": [str(o.pk) for o in rows]},
    )


def tenant_form(tenant: Tenant, members: list[tuple[int | None, int | None]] = (), **fields) -> dict:
    """The tenant change form as the browser posts it; ``members``: (membership id, user id) rows."""
    data = {
        "name": tenant.name,
        "description": tenant.description,
        "enabled": "on" if tenant.enabled else "",
        "budget_period": tenant.budget_period,
        "max_priority": tenant.max_priority,
        "weight": str(tenant.weight),
        "memberships-TOTAL_FORMS": str(len(members)),
        "memberships-INITIAL_FORMS": str(sum(1 for m, _ in members if m)),
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
        "api_keys-TOTAL_FORMS": "0",
        "api_keys-INITIAL_FORMS": "0",
        "api_keys-MIN_NUM_FORMS": "0",
        "api_keys-MAX_NUM_FORMS": "1000",
    }
    for i, (membership_id, user_id) in enumerate(members):
        data[f"memberships-{i}-id"] = str(membership_id or "")
        data[f"memberships-{i}-tenant"] = str(tenant.pk)
        data[f"memberships-{i}-user"] = str(user_id or "")
    data.update(fields)
    return data


def test_tenant_pages_render(admin_client, tenant, user, dev_backend):
    Membership.objects.create(user=user, tenant=tenant)
    ApiKey.issue(tenant, "ci")
    listing = admin_client.get(reverse("admin:tenants_tenant_changelist"))
    assert listing.status_code == 200 and b"acme" in listing.content
    page = admin_client.get(reverse("admin:tenants_tenant_change", args=[tenant.pk]))
    assert page.status_code == 200
    assert b"alice" in page.content and b"llmo_" in page.content  # member and key prefix
    assert b"Tokens today" in page.content and b"Spend this period" in page.content  # usage vs limits
    assert b"Tokens today" in listing.content
    assert admin_client.get(reverse("admin:tenants_tenant_add")).status_code == 200
    assert admin_client.get(reverse("admin:tenants_tenant_changelist") + "?q=acm").status_code == 200


def test_saving_a_tenant_in_the_admin_is_audited_and_checks_backends(admin_client, tenant, dev_backend):
    url = reverse("admin:tenants_tenant_change", args=[tenant.pk])
    r = admin_client.post(url, tenant_form(tenant, weight="5", allowed_backends=["dev"], rpm_limit="60"))
    assert r.status_code == 302, r.context["adminform"].form.errors if r.context else r
    tenant.refresh_from_db()
    assert (tenant.weight, tenant.allowed_backends, tenant.rpm_limit) == (5, ["dev"], 60)
    entry = AuditEntry.objects.get(target_type="tenants.tenant", action="update")
    assert entry.source == "admin" and entry.changes["weight"] == [1, 5]

    bad = admin_client.post(url, tenant_form(tenant, allowed_backends=["ghost"]))
    assert bad.status_code == 200  # the form again, with the error
    assert Tenant.objects.get(pk=tenant.pk).allowed_backends == ["dev"]


@pytest.mark.django_db(transaction=True)
def test_members_are_added_and_removed_through_the_inline(admin_client, tenant, user, django_user_model):
    other = Tenant.objects.create(name="globex")
    bob = django_user_model.objects.create_user("bob", password="pw-bob-123")
    Membership.objects.create(user=bob, tenant=other)
    assert identity.tenant_of_user(user.pk) is None
    url = reverse("admin:tenants_tenant_change", args=[tenant.pk])

    r = admin_client.post(url, tenant_form(tenant, [(None, user.pk)]))
    assert r.status_code == 302
    assert Membership.objects.get(user=user).tenant == tenant
    assert identity.tenant_of_user(user.pk) == tenant  # forgotten on commit, read again

    refused = admin_client.post(url, tenant_form(tenant, [(None, bob.pk)]))
    assert refused.status_code == 200 and b"globex" in refused.content
    assert Membership.objects.get(user=bob).tenant == other

    membership = Membership.objects.get(user=user)
    data = tenant_form(tenant, [(membership.pk, user.pk)])
    data["memberships-0-DELETE"] = "on"
    assert admin_client.post(url, data).status_code == 302
    assert not Membership.objects.filter(user=user).exists()
    assert identity.tenant_of_user(user.pk) is None
    actions = sorted(AuditEntry.objects.filter(target_type="tenants.membership").values_list("action", flat=True))
    assert actions == ["add_member", "remove_member"]


def test_a_key_issued_in_the_admin_is_shown_once_in_a_message(admin_client, tenant):
    r = admin_client.post(reverse("admin:tenants_apikey_add"), {"tenant": tenant.pk, "name": "deploy"}, follow=True)
    assert r.status_code == 200 and r.redirect_chain[0][1] == 302
    key = ApiKey.objects.get()
    text = " ".join(str(m) for m in r.context["messages"])
    raw = next(word for word in text.split() if word.startswith("llmo_"))
    assert raw.encode() in r.content  # on the page the browser lands on
    assert key.key_hash == hash_key(raw) and key.name == "deploy" and key.tenant == tenant
    assert key.created_by.username == "root"
    page = admin_client.get(reverse("admin:tenants_apikey_change", args=[key.pk]))
    assert page.status_code == 200 and raw.encode() not in page.content  # once only
    assert key_client(raw).get("/jobs").status_code == 200


def test_key_pages_render(admin_client, tenant, issued):
    assert admin_client.get(reverse("admin:tenants_apikey_changelist")).status_code == 200
    assert admin_client.get(reverse("admin:tenants_apikey_changelist") + "?revoked_at__isempty=1").status_code == 200
    assert admin_client.get(reverse("admin:tenants_apikey_add")).status_code == 200
    assert admin_client.get(reverse("admin:tenants_apikey_change", args=[issued[0].pk])).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_the_revoke_action_refuses_the_key_from_the_next_request(admin_client, tenant, issued):
    key, raw = issued
    client = key_client(raw)
    assert client.get("/jobs").status_code == 200
    r = post_action(admin_client, "admin:tenants_apikey_changelist", "revoke_keys", [key])
    assert r.status_code == 302
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
    assert client.get("/jobs").status_code == 401
    entry = AuditEntry.objects.get(action="revoke_key")
    assert entry.source == "admin" and entry.username == "root"


def test_revoking_needs_the_change_permission(client, django_user_model, tenant, issued):
    viewer = staff_with(django_user_model, "viewer", ["view_tenant", "view_apikey", "view_membership"])
    client.force_login(viewer)
    listing = client.get(reverse("admin:tenants_apikey_changelist"))
    assert listing.status_code == 200 and listing.context["action_form"] is None
    assert post_action(client, "admin:tenants_apikey_changelist", "revoke_keys", [issued[0]]).status_code == 403
    assert ApiKey.objects.get().revoked_at is None
    assert client.get(reverse("admin:tenants_tenant_change", args=[tenant.pk])).status_code == 200
    assert client.post(reverse("admin:tenants_apikey_add"), {"tenant": tenant.pk, "name": "x"}).status_code == 403
    assert ApiKey.objects.count() == 1

    operator = staff_with(django_user_model, "operator", ["view_apikey", "change_apikey"])
    client.force_login(operator)
    assert post_action(client, "admin:tenants_apikey_changelist", "revoke_keys", [issued[0]]).status_code == 302
    assert ApiKey.objects.get().revoked_at is not None


def test_keys_are_never_deleted_in_the_admin(admin_client, issued):
    r = admin_client.post(reverse("admin:tenants_apikey_delete", args=[issued[0].pk]), {"post": "yes"})
    assert r.status_code == 403
    assert ApiKey.objects.exists()


def test_the_job_list_shows_and_filters_by_tenant(admin_client, tenant, dev_backend):
    other = Tenant.objects.create(name="globex")
    mine = make_job(dev_backend, tenant=tenant)
    make_job(dev_backend, tenant=other)
    make_job(dev_backend)
    listing = admin_client.get(reverse("admin:jobs_job_changelist"))
    assert listing.status_code == 200 and b"globex" in listing.content
    filtered = admin_client.get(reverse("admin:jobs_job_changelist") + f"?tenant__id__exact={tenant.pk}")
    assert [str(j.pk) for j in filtered.context["cl"].result_list] == [str(mine.pk)]
    assert admin_client.get(reverse("admin:jobs_job_change", args=[mine.pk])).status_code == 200
