"""The Redis mirror of each job's status document, which ``GET /jobs/<id>`` reads first.

Writers (the API at creation, workers at every transition) publish after their
transaction commits. Two processes can publish the same job out of order, so a
write only lands when its job ``version`` is newer than the cached one (a small
Lua compare-and-set): the mirror can lag the database by a moment but never moves
backwards. A miss (expired, flushed) falls back to the database and refills.
Active states expire sooner so that a lost write heals itself quickly.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from django.conf import settings
from redis.exceptions import RedisError

from orchestrator_site.redis import key, redis_client

if TYPE_CHECKING:
    from redis.client import Pipeline


class MirroredJob(Protocol):
    """What the mirror needs of a ``jobs.models.Job``; named by its shape, because the state machine imports this."""

    pk: Any
    version: int

    @property
    def is_terminal(self) -> bool: ...

    def status_document(self) -> dict[str, Any]: ...


log = logging.getLogger(__name__)
ACTIVE_TTL_S = 30

_CAS = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local v = tonumber(string.match(cur, '^(%d+)|'))
  if v and v >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'EX', ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[1])
return 1
"""
_script = None
_local = threading.local()


def cache_key(job_id: object) -> str:
    return key("job", job_id)


def notify_channel(job_id: object) -> str:
    """The pub/sub channel that says "look again" to whoever follows the job (``jobs.relay``)."""
    return key("notify", job_id)


def _cas():
    global _script
    if _script is None:
        _script = redis_client().register_script(_CAS)
    return _script


def write(job: MirroredJob, doc: dict[str, Any], pipeline: Pipeline | None = None) -> None:
    ttl = settings.JOB_STATUS_CACHE_TTL_S if job.is_terminal else min(ACTIVE_TTL_S, settings.JOB_STATUS_CACHE_TTL_S)
    payload = json.dumps(doc, separators=(",", ":"), default=str)
    if pipeline is not None:
        # A Script run in a pipeline makes redis-py send SCRIPT EXISTS (one more round trip)
        # every time the pipeline executes; EVAL carries the body instead (Redis caches it by SHA).
        pipeline.eval(_CAS, 2, cache_key(job.pk), notify_channel(job.pk), job.version, payload, ttl)
        return
    _cas()(keys=[cache_key(job.pk), notify_channel(job.pk)], args=[job.version, payload, ttl])


def publish(job: MirroredJob) -> None:
    """Mirror ``job`` after a committed change; a Redis failure only costs a cache miss later."""
    pending = getattr(_local, "pending", None)
    if pending is not None:
        pending[job.pk] = job  # inside batched(): one write per job, the latest
        return
    try:
        write(job, job.status_document())
    except RedisError as exc:
        log.warning("status mirror write failed", extra={"job_id": str(job.pk), "error": str(exc)})


@contextmanager
def batched() -> Iterator[None]:
    """Collect this thread's publishes and write them in one pipeline at the end (a group commit's)."""
    if getattr(_local, "pending", None) is not None:
        yield  # already collecting: the outer block writes
        return
    _local.pending = pending = {}
    try:
        yield
    finally:
        _local.pending = None
        if pending:
            try:
                with redis_client().pipeline(transaction=False) as pipe:
                    for job in pending.values():
                        write(job, job.status_document(), pipeline=pipe)
                    pipe.execute()
            except RedisError as exc:
                log.warning("status mirror write failed", extra={"jobs": len(pending), "error": str(exc)})


def read(job_id: object) -> dict[str, Any] | None:
    """The mirrored document, or None on a miss or when Redis does not answer (read the DB then)."""
    try:
        raw = redis_client().get(cache_key(job_id))
    except RedisError as exc:
        log.warning("status mirror unavailable; reading the database", extra={"job_id": str(job_id), "error": str(exc)})
        return None
    if raw is None:
        return None
    _, _, payload = raw.partition(b"|")
    return json.loads(payload)
