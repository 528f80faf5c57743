"""A batch whose last count was lost is finalized by the reconciler; held lines are never pushed as lost,
and a window lost with Redis is recounted; the admin shows and serves batches."""

from __future__ import annotations

import json
from datetime import timedelta

from django.core.files.base import ContentFile
from django.test import Client
from django.utils import timezone

from batches import finalizing, hooks, progress, recovery, tasks
from batches.models import Batch, BatchStatus, File, FilePurpose, files_storage
from jobs import fair_queue, queue_position
from jobs.models import Job, JobState
from workers.fleet import reconciler


def a_batch(user, n: int, **fields) -> Batch:
    blob = files_storage().save("in.jsonl", ContentFile(b"{}\n"))
    file = File.objects.create(purpose=FilePurpose.BATCH, filename="in.jsonl", bytes=3, blob=blob, created_by=user)
    now = timezone.now()
    batch = Batch.objects.create(
        input_file=file, created_by=user, expires_at=now + timedelta(hours=1), total=n, lines_created=n, **fields
    )
    Job.objects.bulk_create(
        Job(batch=batch, custom_id=f"r{i}", state=JobState.SUCCEEDED, output=f"out {i}", timeout_s=60, created_by=user)
        for i in range(n)
    )
    return batch


def test_a_batch_whose_lines_ended_uncounted_is_finalized_by_the_reconciler(
    db, user, redis_db, django_capture_on_commit_callbacks
):
    batch = a_batch(user, 3, status=BatchStatus.IN_PROGRESS)
    Batch.objects.filter(pk=batch.pk).update(updated_at=timezone.now() - timedelta(minutes=5))
    ended = []
    hooks.on_batch_ended(ended.append)
    try:
        assert recovery.reconcile_batches() == 1
        assert f"batch-finalize-{batch.pk}".encode() in redis_db.zrange(
            f"{fair_queue.PREFIX}q:high:t:{tasks.FAIR_KEY}", 0, -1
        )
        with django_capture_on_commit_callbacks(execute=True):
            finalizing.finalize(batch.pk)
            finalizing.finalize(batch.pk)  # idempotent: a second run changes nothing
    finally:
        hooks._ended.remove(ended.append)
    batch.refresh_from_db()
    assert batch.status == BatchStatus.COMPLETED and (batch.completed, batch.failed) == (3, 0)
    assert batch.error_file_id is None and File.objects.filter(purpose=FilePurpose.BATCH_OUTPUT).count() == 1
    lines = [json.loads(x) for x in files_storage().open(batch.output_file.blob).read().splitlines()]
    assert [x["custom_id"] for x in lines] == ["r0", "r1", "r2"]
    assert lines[1]["response"]["body"]["choices"][0]["message"]["content"] == "out 1"
    assert [b.pk for b in ended] == [batch.pk]  # the final move's hook ran once
    assert recovery.reconcile_batches() == 0


def test_a_fresh_or_running_batch_is_left_alone(db, user):
    a_batch(user, 2, status=BatchStatus.IN_PROGRESS)  # just written
    running = a_batch(user, 1, status=BatchStatus.IN_PROGRESS)
    Job.objects.filter(batch=running).update(state=JobState.QUEUED, enqueued_at=timezone.now())  # pushed, waiting
    Batch.objects.filter(pk=running.pk).update(updated_at=timezone.now() - timedelta(minutes=5))
    assert recovery.reconcile_batches() == 0


def test_the_admin_lists_batches_and_serves_files_only_to_staff(admin_client, user, db):
    batch = a_batch(user, 2, status=BatchStatus.IN_PROGRESS)
    page = admin_client.get("/admin/batches/batch/")
    assert page.status_code == 200 and batch.pk in page.content.decode() and "<progress" in page.content.decode()
    url = f"/admin/batches/file/{batch.input_file_id}/download/"
    assert admin_client.get(url).status_code == 200
    other = Client()
    other.force_login(user)  # not staff
    assert other.get(url).status_code in (302, 403)
    response = admin_client.post(
        "/admin/batches/batch/",
        {"action": "cancel_batches", "select_across": "0", "index": "0", "_selected_action": [batch.pk]},
        follow=True,
    )
    assert response.status_code == 200
    batch.refresh_from_db()
    assert batch.status == BatchStatus.CANCELLING


def test_held_lines_are_not_lost_jobs_and_a_window_lost_with_redis_is_recounted(db, user, redis_db, settings):
    settings.BATCH_WINDOW = 3
    batch = a_batch(user, 8, status=BatchStatus.IN_PROGRESS)
    long_ago = timezone.now() - timedelta(minutes=5)
    lines = {job.custom_id: job for job in Job.objects.filter(batch=batch)}
    for name in [f"r{i}" for i in range(2, 8)]:  # six lines held by the window, as batches.creation makes them
        Job.objects.filter(pk=lines[name].pk).update(
            state=JobState.QUEUED, queue="low", priority="low", rq_job_id=str(lines[name].pk), created_at=long_ago
        )
    Batch.objects.filter(pk=batch.pk).update(updated_at=long_ago)  # and Redis lost the batch's hash

    assert reconciler.requeue_lost_jobs(min_age_s=0) == 0  # held, not lost: nothing pushed
    assert fair_queue.waiting_ids("low") == []
    assert recovery.reconcile_batches() == 1  # the window recounted from the rows and filled
    # the first held lines in custom_id order (pushed together: one enqueue time, so any order among them)
    assert sorted(fair_queue.waiting_ids("low")) == sorted(str(lines[f"r{i}"].pk) for i in (2, 3, 4))
    key = fair_queue.tenant_key(None)
    assert int(redis_db.get(fair_queue.tenant_batched_key(key))) == 3
    assert redis_db.hmget(progress.counts_key(batch.pk), "total", "completed", "window") == [b"8", b"2", b"3"]
    assert queue_position.held_place(str(lines["r7"].pk)).position == 3 + 2 + 1  # behind the window and r5, r6
    assert queue_position.held_place(str(lines["r2"].pk)) == queue_position.UNKNOWN  # pushed: not held
    assert queue_position.place("low", None, str(lines["r2"].pk)).position in (1, 2, 3)

    taken = fair_queue.take(["low"])  # a worker runs a line to its end: its room in the window goes to r5
    assert len(taken) == 1 and taken[0].batch == "1"
    Job.objects.filter(pk=taken[0].job_id).update(state=JobState.SUCCEEDED)
    progress.count_ended([Job.objects.get(pk=taken[0].job_id)])
    expected = {str(lines[f"r{i}"].pk) for i in (2, 3, 4, 5)} - {taken[0].job_id}
    assert sorted(fair_queue.waiting_ids("low")) == sorted(expected)
    assert reconciler.requeue_lost_jobs(min_age_s=0) == 0  # the pushed lines are where they should be
    assert Job.objects.filter(batch=batch, state=JobState.QUEUED, enqueued_at__isnull=True).count() == 2
