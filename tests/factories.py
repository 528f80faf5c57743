"""Small builders for rows the tests need (no factory library: the models are simple)."""

from __future__ import annotations

from jobs.models import Job, JobState
from routing.models import Backend


def make_job(backend: Backend | None = None, **fields) -> Job:
    defaults = {
        "state": JobState.QUEUED,
        "prompt": "hello",
        "timeout_s": 30,
        "backend": backend,
        "backend_name": backend.name if backend else "",
        "queue": "normal",
    }
    defaults.update(fields)
    job = Job(**defaults)
    job.rq_job_id = str(job.pk)
    job.save(force_insert=True)
    return job
