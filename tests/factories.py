"""Small builders for rows and requests the tests need (no factory library: the models are simple)."""

from __future__ import annotations

import threading
from typing import Any

from jobs.models import Job, JobState
from routing.models import Backend
from workers.backends.base import BackendConfig, GenerationRequest


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


def ask(**kw: Any) -> GenerationRequest:
    """A generation request as an adapter gets it: one user message, ``one two three``."""
    return GenerationRequest(**{"job_id": "j1", "messages": [{"role": "user", "content": "one two three"}], **kw})


def outputs_from_threads(adapter: Any, backend: BackendConfig, n: int = 8) -> list[str]:
    """``n`` threads each call ``adapter.generate`` with their own message; their outputs, sorted."""
    outputs: list[str] = []

    def run(i: int) -> None:
        outputs.append(adapter.generate(backend, ask(messages=[{"role": "user", "content": f"n {i}"}])).output)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(outputs)
