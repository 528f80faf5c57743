"""The operator dashboard follows a job live: submitted in one tab, seen succeeding in another.

The dashboard (`admin:dashboard`, /admin/dashboard/) marks each recent job's row with
``data-job-id`` and ``data-state`` and refreshes its panels every few seconds without a reload.
"""

from __future__ import annotations

import json

import pytest

from jobs.models import Job, JobState
from tests.browser.conftest import (
    api_submit,
    expect,
    log_in,
    save_screenshot,
    submit_through_browsable_api,
    wait_for_state,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

LIVE_UPDATE_TIMEOUT_MS = 20_000


def test_job_submitted_in_the_browser_shows_up_succeeded_on_the_open_dashboard(
    page, web, operator, routable, rq_worker
):
    log_in(page, web, operator)
    # Some traffic first, so the dashboard has history to show (and the screenshot something to say).
    earlier = [api_submit(web, operator, {"prompt": f"warm-up {p}", "priority": p})["id"] for p in ("high", "low")]
    wait_for_state(earlier, JobState.SUCCEEDED)  # the worker runs; what follows is about the page

    response = page.goto(f"{web}/admin/dashboard/")
    assert response.ok, f"/admin/dashboard/ answered HTTP {response.status}"
    expect(page.locator(f'tr[data-job-id="{earlier[-1]}"][data-state="succeeded"]')).to_be_visible()
    page.evaluate("window.__notReloaded = true")  # gone if the page reloads instead of refreshing panels

    form_tab = page.context.new_page()
    job_id = submit_through_browsable_api(form_tab, web, json.dumps({"prompt": "watch me on the dashboard"}))
    form_tab.close()

    row = page.locator(f'tr[data-job-id="{job_id}"][data-state="succeeded"]')
    expect(row).to_be_visible(timeout=LIVE_UPDATE_TIMEOUT_MS)
    assert page.evaluate("window.__notReloaded === true"), "the dashboard reloaded the page to refresh"
    assert Job.objects.get(pk=job_id).state == JobState.SUCCEEDED

    save_screenshot(page, "dashboard")
