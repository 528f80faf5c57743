"""An operator cancels a queued job from the admin's job list with the cancel action."""

from __future__ import annotations

import re

import pytest

from jobs.models import Job, JobState
from tests.browser.conftest import api_submit, expect, log_in

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_operator_cancels_a_queued_job_with_the_admin_list_action(page, web, operator, routable):
    # No worker listens: both jobs stay queued. Only the ticked one may be canceled.
    doomed = api_submit(web, operator, {"prompt": "cancel me"})["id"]
    spared = api_submit(web, operator, {"prompt": "leave me be"})["id"]
    assert set(Job.objects.values_list("state", flat=True)) == {JobState.QUEUED}

    log_in(page, web, operator)
    page.goto(f"{web}/admin/jobs/job/")
    page.check(f'input[name="_selected_action"][value="{doomed}"]')
    cancel = page.locator('select[name="action"] option').filter(has_text=re.compile("cancel", re.IGNORECASE))
    page.select_option('select[name="action"]', value=cancel.first.get_attribute("value"))
    page.get_by_role("button", name="Go").click()

    expect(page.locator("ul.messagelist")).to_be_visible()
    doomed_row = page.locator("#result_list tr").filter(has=page.locator(f'input[value="{doomed}"]'))
    spared_row = page.locator("#result_list tr").filter(has=page.locator(f'input[value="{spared}"]'))
    expect(doomed_row.locator("td.field-state")).to_have_text(re.compile("canceled", re.IGNORECASE))
    expect(spared_row.locator("td.field-state")).to_have_text(re.compile("queued", re.IGNORECASE))
    assert Job.objects.get(pk=doomed).state == JobState.CANCELED
    assert Job.objects.get(pk=spared).state == JobState.QUEUED
