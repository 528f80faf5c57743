"""An operator submits a job through the DRF browsable API's form, logged in with the admin session."""

from __future__ import annotations

import json

import pytest

from jobs.models import Job, JobState
from tests.browser.conftest import log_in, submit_through_browsable_api

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_job_submitted_with_the_browsable_api_form_is_created_for_the_logged_in_operator(page, web, operator, routable):
    log_in(page, web, operator)
    job_id = submit_through_browsable_api(page, web, json.dumps({"prompt": "typed in a browser", "priority": "high"}))

    job = Job.objects.get(pk=job_id)
    assert job.prompt == "typed in a browser"
    assert job.priority == "high"
    assert job.created_by.username == operator.username  # the session, not a token, authenticated it
    assert job.state == JobState.QUEUED and job.backend_name == routable.name
