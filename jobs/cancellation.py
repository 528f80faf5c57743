"""Telling the worker that runs a job that the job was canceled, so it can stop the call early.

``Job.cancel`` wins the compare-and-set in the database; that alone makes the job ``canceled``
and discards any late result. For a running job it also sets ``llmo:cancel:<job id>`` (after
commit); the worker process polls these keys for the jobs it runs (``workers.runtime.job_threads``) and
signals the job's ``cancel`` event, which adapters check (the dev backend's wait, Ollama's stream
between tokens, the retry backoff) to stop at once and free the slot.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from redis.exceptions import RedisError

from orchestrator_site.redis import key, redis_client

log = logging.getLogger(__name__)
TTL_S = 3600  # longer than any job's deadline: the key only has to outlive the run


def cancel_key(job_id: str) -> str:
    return key("cancel", job_id)


def request_stop(job_id: str) -> None:
    """Ask the worker running ``job_id`` to stop it; best effort (the CAS already decided)."""
    try:
        redis_client().set(cancel_key(job_id), "1", ex=TTL_S)
    except RedisError as exc:
        log.warning("cancel signal not sent; the result will be discarded", extra={"job_id": job_id, "error": str(exc)})


def requested(job_ids: Iterable[str]) -> set[str]:
    """Which of ``job_ids`` were canceled while running (one round trip)."""
    ids = list(job_ids)
    if not ids:
        return set()
    flags = redis_client().mget([cancel_key(i) for i in ids])
    return {job_id for job_id, flag in zip(ids, flags, strict=True) if flag}
