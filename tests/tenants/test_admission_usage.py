"""A tenant's usage vs its limits: from the admission counters, else from its rows; shown by
``UsageMixin`` on a Tenant admin."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib import admin
from django.test import RequestFactory
from django.utils import timezone

from jobs.models import JobState
from tenants import admission, usage
from tenants.models import Tenant
from tenants.usage_admin import USAGE_FIELDS, UsageMixin
from tests.factories import make_job

pytestmark = pytest.mark.django_db


class MinimalTenantAdmin(UsageMixin, admin.ModelAdmin):
    list_display = ("name", "enabled")
    readonly_fields = ("created_at",)


@pytest.fixture
def tenant(dev_backend) -> Tenant:
    t = Tenant.objects.create(name="acme", tokens_per_day=5000, budget_usd=Decimal("20"), budget_period="month")
    make_job(dev_backend, tenant=t, state=JobState.SUCCEEDED, prompt_tokens=100, completion_tokens=23, cost="1.5")
    make_job(dev_backend, tenant=t, state=JobState.QUEUED, reserved_tokens=400)
    make_job(dev_backend, tenant=t, state=JobState.FAILED, reserved_tokens=400)  # released
    return t


def test_usage_from_the_rows_when_redis_has_no_counter(tenant):
    u = usage.usage_of(tenant)
    assert (u.tokens_today, u.tokens_limit, u.spend, u.budget, u.period) == (523, 5000, Decimal("1.5"), 20, "month")
    assert usage.tokens_text(u) == "523 / 5,000"
    assert usage.spend_text(u) == "$1.50 / $20.00 (this month)"


def test_usage_from_the_admission_counters(tenant, redis_db):
    redis_db.set(admission.tokens_key(tenant.pk, timezone.now()), 4321)
    redis_db.set(admission.spend_key(tenant.pk, "month", timezone.now()), 2_500_000)
    u = usage.usage_of(tenant)
    assert (u.tokens_today, u.spend) == (4321, Decimal("2.5"))
    assert u.tokens_share == pytest.approx(4321 / 5000) and u.spend_share == pytest.approx(0.125)


def test_without_limits_it_says_so(dev_backend):
    t = Tenant.objects.create(name="free", budget_period="day")
    u = usage.usage_of(t)
    assert usage.tokens_text(u) == "0 / no limit" and usage.spend_text(u) == "$0.00 / no budget (this day)"


def test_the_mixin_adds_read_only_fields_and_columns(tenant, staff):
    model_admin = MinimalTenantAdmin(Tenant, admin.site)
    request = RequestFactory().get("/admin/tenants/tenant/")
    request.user = staff
    assert model_admin.get_list_display(request) == ("name", "enabled", *USAGE_FIELDS)
    assert model_admin.get_readonly_fields(request, tenant) == ("created_at", *USAGE_FIELDS)
    assert model_admin.get_readonly_fields(request) == ("created_at",)  # the add page
    assert set(USAGE_FIELDS) <= set(model_admin.get_fields(request, tenant))
    assert model_admin.tokens_today(tenant) == "523 / 5,000"
    assert model_admin.spend_this_period(tenant) == "$1.50 / $20.00 (this month)"
