"""Where a Job meets an adapter: the one mapping from a row to a request, and from a result to the row."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from jobs.models import RESULT_FIELDS, Job
from routing.models import Backend
from workers.backends.base import DeltaSink, GenerationRequest, GenerationResult

# OpenAI request fields a job carries in its ``params`` that every adapter maps itself (see
# ``GenerationRequest``): taken out of the params that pass through as they are.
OPENAI_FIELDS = ("tools", "tool_choice", "response_format", "stop", "top_p", "seed")


def generation_request(
    job: Job, timeout_s: float, cancel: threading.Event | None = None, on_delta: DeltaSink | None = None
) -> GenerationRequest:
    """What an adapter gets for one call of ``job`` (no ORM object crosses the adapter line)."""
    params = dict(job.params)
    lifted = {name: params.pop(name) for name in OPENAI_FIELDS if params.get(name) is not None}
    return GenerationRequest(
        job_id=str(job.pk),
        messages=job.chat_messages(),
        images=job.image_payloads(),
        model=job.model,
        max_tokens=job.max_tokens,
        temperature=job.temperature,
        params=params,
        timeout_s=timeout_s,
        attempt=job.attempt_count,
        cancel=cancel if cancel is not None else threading.Event(),
        on_delta=on_delta,
        **lifted,
    )


def success_fields(
    result: GenerationResult, backend: Backend, *, finished_at: datetime | None = None
) -> dict[str, Any]:
    """The Job's ``SUCCESS_FIELDS`` for ``result`` on ``backend`` (``Job.mark_succeeded_many``'s item).

    ``finished_at``: when the result came, if its write may come a moment later (group commit).
    """
    fields: dict[str, Any] = {name: getattr(result, name) for name in RESULT_FIELDS}
    fields["tool_calls"] = result.tool_calls
    fields["cost"] = backend.cost_for(result.prompt_tokens, result.completion_tokens)
    if finished_at is not None:
        fields["finished_at"] = finished_at
    return fields
