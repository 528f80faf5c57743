"""Where a Job meets an adapter: the one mapping from a row to a request, and from a result to the row."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from jobs.models import RESULT_FIELDS, Job
from routing.models import Backend
from workers.backends.base import GenerationRequest, GenerationResult


def generation_request(job: Job, timeout_s: float, cancel: threading.Event | None = None) -> GenerationRequest:
    """What an adapter gets for one call of ``job`` (no ORM object crosses the adapter line)."""
    return GenerationRequest(
        job_id=str(job.pk),
        messages=job.chat_messages(),
        images=job.image_payloads(),
        model=job.model,
        max_tokens=job.max_tokens,
        temperature=job.temperature,
        params=dict(job.params),
        timeout_s=timeout_s,
        attempt=job.attempt_count,
        cancel=cancel if cancel is not None else threading.Event(),
    )


def success_fields(
    result: GenerationResult, backend: Backend, *, finished_at: datetime | None = None
) -> dict[str, Any]:
    """The Job's ``SUCCESS_FIELDS`` for ``result`` on ``backend`` (``Job.mark_succeeded_many``'s item).

    ``finished_at``: when the result came, if its write may come a moment later (group commit).
    """
    fields: dict[str, Any] = {name: getattr(result, name) for name in RESULT_FIELDS}
    fields["cost"] = backend.cost_for(result.prompt_tokens, result.completion_tokens)
    if finished_at is not None:
        fields["finished_at"] = finished_at
    return fields
