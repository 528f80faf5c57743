"""Images live out of the job row: stored once per content, read only by the worker, moved by a migration."""

from __future__ import annotations

import base64
import hashlib

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test.utils import CaptureQueriesContext

from jobs import status_mirror
from jobs.models import Job, JobImage, JobImageLink
from routing.models import Backend, BackendKind

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00" * 32
GIF = b"GIF89a" + b"\x01" * 40
PNG_B64 = base64.b64encode(PNG).decode()
GIF_B64 = base64.b64encode(GIF).decode()


@pytest.fixture
def vision(db, policy) -> Backend:
    return Backend.objects.create(name="vision", kind=BackendKind.DEV, supports_multimodal=True)


def submit(api, images: list[str]) -> Job:
    resp = api.post("/jobs", {"prompt": "what is this", "images": images}, format="json")
    assert resp.status_code == 202, resp.content
    return Job.objects.get(pk=resp.json()["id"])


@pytest.mark.django_db
def test_images_come_back_in_submission_order_and_each_content_is_stored_once(api, vision):
    first = submit(api, [GIF_B64, "data:image/png;base64," + PNG_B64, GIF_B64])
    second = submit(api, [PNG_B64])

    assert first.image_payloads() == [GIF_B64, PNG_B64, GIF_B64]
    assert second.image_payloads() == [PNG_B64]
    assert (first.image_count, second.image_count) == (3, 1)
    stored = {i.sha256: (i.media_type, i.size) for i in JobImage.objects.all()}
    assert stored == {
        hashlib.sha256(PNG).hexdigest(): ("image/png", len(PNG)),
        hashlib.sha256(GIF).hexdigest(): ("image/gif", len(GIF)),
    }
    assert JobImageLink.objects.count() == 4


@pytest.mark.django_db
def test_a_text_job_reads_no_image_table(api, policy):
    job = Job.objects.get(pk=api.post("/jobs", {"prompt": "hi"}, format="json").json()["id"])
    with CaptureQueriesContext(connection) as queries:
        assert job.image_payloads() == []
    assert len(queries) == 0


@pytest.mark.django_db
def test_listing_and_status_reads_never_touch_image_bytes(api, vision, redis_db):
    job = submit(api, [PNG_B64])
    redis_db.delete(status_mirror.cache_key(job.pk))  # a mirror miss: the status read goes to the database
    with CaptureQueriesContext(connection) as queries:
        assert api.get("/jobs").status_code == 200
        assert api.get(f"/jobs/{job.pk}").status_code == 200
        assert api.get(f"/jobs/{job.pk}/result").status_code == 202
    sql = " ".join(q["sql"] for q in queries.captured_queries)
    assert "jobs_job" in sql
    assert "jobs_jobimage" not in sql


@pytest.mark.django_db(transaction=True)
def test_migration_moves_images_out_of_the_row_and_back(dev_backend):
    try:
        executor = MigrationExecutor(connection)
        executor.migrate([("jobs", "0004_job_trace_id")])
        old = executor.loader.project_state([("jobs", "0004_job_trace_id")]).apps
        OldJob = old.get_model("jobs", "Job")
        with_images = OldJob.objects.create(prompt="a", timeout_s=30, images=[PNG_B64, GIF_B64, PNG_B64])
        OldJob.objects.create(prompt="b", timeout_s=30, images=[PNG_B64])
        text_only = OldJob.objects.create(prompt="c", timeout_s=30)

        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate([("jobs", "0005_job_images")])
        at_0005 = Job.objects.only("id", "image_count")  # later migrations add columns the model already has
        job = at_0005.get(pk=with_images.pk)
        assert job.image_payloads() == [PNG_B64, GIF_B64, PNG_B64]
        assert at_0005.get(pk=text_only.pk).image_count == 0
        assert JobImage.objects.count() == 2 and JobImageLink.objects.count() == 4

        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate([("jobs", "0004_job_trace_id")])
        old = executor.loader.project_state([("jobs", "0004_job_trace_id")]).apps
        assert old.get_model("jobs", "Job").objects.get(pk=with_images.pk).images == [PNG_B64, GIF_B64, PNG_B64]
    finally:  # whatever failed, the next tests get the current schema back
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
