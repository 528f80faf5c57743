"""An operator switches the active routing policy in the admin; the next job is routed by it."""

from __future__ import annotations

import re

import pytest

from jobs.models import Job
from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy
from tests.browser.conftest import api_submit, expect, log_in

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def two_policies(transactional_db) -> tuple[RoutingPolicy, RoutingPolicy]:
    for name in ("alpha", "beta"):
        Backend.objects.create(name=name, kind=BackendKind.DEV, config={"latency_ms": 0})
    prefer_alpha = RoutingPolicy.objects.create(name="prefer-alpha", strategy="ordered", params={"order": ["alpha"]})
    prefer_beta = RoutingPolicy.objects.create(name="prefer-beta", strategy="ordered", params={"order": ["beta"]})
    policies.activate(prefer_alpha)
    return prefer_alpha, prefer_beta


def test_policy_activated_in_the_admin_routes_the_next_job(page, web, operator, two_policies):
    prefer_alpha, prefer_beta = two_policies
    before = api_submit(web, operator, {"prompt": "routed by prefer-alpha"})
    assert Job.objects.get(pk=before["id"]).backend_name == "alpha"

    log_in(page, web, operator)
    page.goto(f"{web}/admin/routing/routingpolicy/{prefer_beta.pk}/change/")
    activate = re.compile(r"^\s*activate", re.IGNORECASE)
    page.get_by_role("link", name=activate).or_(page.get_by_role("button", name=activate)).first.click()

    # Activation goes through a confirmation page that shows what will change; confirm it there.
    confirm = page.get_by_role("button", name=re.compile(r"activate|confirm", re.IGNORECASE))
    expect(confirm).to_be_visible()
    expect(page.locator("#content")).to_contain_text("prefer-alpha")  # what is active now...
    expect(page.locator("#content")).to_contain_text("prefer-beta")  # ...and what replaces it
    assert not RoutingPolicy.objects.get(pk=prefer_beta.pk).is_active, "activated before the operator confirmed"
    confirm.click()
    expect(page.locator("ul.messagelist")).to_contain_text("prefer-beta")

    assert list(RoutingPolicy.objects.filter(is_active=True).values_list("name", flat=True)) == ["prefer-beta"]
    after = api_submit(web, operator, {"prompt": "routed by prefer-beta"})
    job = Job.objects.get(pk=after["id"])
    assert (job.backend_name, job.policy_name) == ("beta", "prefer-beta")
