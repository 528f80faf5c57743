"""Bulk actions on the job and backend lists: each changes only the eligible rows and says how many."""

from __future__ import annotations

import pytest
from django.urls import reverse

from jobs import fair_queue
from jobs.models import Job, JobState
from routing.models import Backend, BackendKind
from tests.factories import make_job

pytestmark = pytest.mark.django_db(transaction=True)


def run_action(admin_client, changelist: str, action: str, rows) -> list[str]:
    """Post the changelist form the way the browser does (action select + ticked rows + Go)."""
    r = admin_client.post(
        reverse(changelist),
        {"action": action, "select_across": "0", "index": "0", "_selected_action": [str(o.pk) for o in rows]},
        follow=True,
    )
    assert r.status_code == 200
    return [str(m) for m in r.context["messages"]]


def states(*jobs: Job) -> list[str]:
    return [Job.objects.get(pk=j.pk).state for j in jobs]


def test_the_job_list_offers_the_actions(admin_client, dev_backend):
    make_job(dev_backend)
    html = admin_client.get(reverse("admin:jobs_job_changelist")).content.decode()
    assert '<option value="cancel_jobs">' in html and '<option value="retry_jobs">' in html


def test_cancel_cancels_queued_and_running_jobs_and_skips_finished_ones(admin_client, dev_backend):
    queued = make_job(dev_backend)
    running = make_job(dev_backend)
    running.mark_running("w1")
    done = make_job(dev_backend, state=JobState.SUCCEEDED)
    failed = make_job(dev_backend, state=JobState.FAILED)

    msgs = run_action(admin_client, "admin:jobs_job_changelist", "cancel_jobs", [queued, running, done, failed])

    assert msgs == ["Canceled 2 job(s). Skipped 2 that were no longer queued or running."]
    assert states(queued, running, done, failed) == ["canceled", "canceled", "succeeded", "failed"]
    assert running.attempts.get().outcome == "canceled"  # the open attempt is closed by Job.cancel


def test_cancel_with_nothing_cancelable_changes_nothing(admin_client, dev_backend):
    done = make_job(dev_backend, state=JobState.SUCCEEDED)
    assert run_action(admin_client, "admin:jobs_job_changelist", "cancel_jobs", [done]) == [
        "Canceled 0 job(s). Skipped 1 that were no longer queued or running."
    ]
    assert states(done) == ["succeeded"]


def test_retry_requeues_failed_and_canceled_jobs_and_skips_the_rest(admin_client, dev_backend):
    failed = make_job(dev_backend)
    failed.mark_running("w")
    failed.mark_failed("boom")
    canceled = make_job(dev_backend)
    canceled.cancel()
    queued = make_job(dev_backend)
    done = make_job(dev_backend, state=JobState.SUCCEEDED, output="kept")

    msgs = run_action(admin_client, "admin:jobs_job_changelist", "retry_jobs", [failed, canceled, queued, done])

    assert msgs == ["Re-queued 2 job(s). Skipped 2 that were not failed or canceled."]
    assert states(failed, canceled, queued, done) == ["queued", "queued", "queued", "succeeded"]
    assert Job.objects.get(pk=failed.pk).error == "" and Job.objects.get(pk=done.pk).output == "kept"
    on_queue = [i.encode() for i in fair_queue.waiting_ids("normal")]
    assert str(failed.pk).encode() in on_queue and str(canceled.pk).encode() in on_queue
    assert str(queued.pk).encode() not in on_queue  # skipped: not enqueued a second time
    assert list(failed.attempts.values_list("outcome", flat=True)) == ["failed"]  # history kept


def test_drain_and_undrain_report_what_changed(admin_client, dev_backend):
    draining = Backend.objects.create(name="old", kind=BackendKind.DEV, drain=True)
    other = Backend.objects.create(name="other", kind=BackendKind.DEV)
    changelist = "admin:routing_backend_changelist"

    msgs = run_action(admin_client, changelist, "drain_selected", [dev_backend, draining, other])
    assert msgs == ["Draining 2 backend(s): routing sends them no new jobs. Skipped 1 already draining."]
    assert list(Backend.objects.order_by("name").values_list("name", "drain")) == [
        ("dev", True),
        ("old", True),
        ("other", True),
    ]

    other.drain = False
    other.save()
    msgs = run_action(admin_client, changelist, "undrain_selected", [dev_backend, other])
    assert msgs == ["Undrained 1 backend(s): they take new jobs again. Skipped 1 that were not draining."]
    assert not Backend.objects.get(pk=dev_backend.pk).drain


def test_enable_and_disable_report_counts(admin_client, dev_backend):
    off = Backend.objects.create(name="off", kind=BackendKind.DEV, enabled=False)
    changelist = "admin:routing_backend_changelist"
    assert run_action(admin_client, changelist, "disable", [dev_backend, off]) == [
        "Disabled 1 backend(s). Skipped 1 already disabled."
    ]
    assert run_action(admin_client, changelist, "enable", [dev_backend, off]) == ["Enabled 2 backend(s)."]
    assert set(Backend.objects.values_list("enabled", flat=True)) == {True}
