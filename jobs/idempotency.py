"""``Idempotency-Key`` handling: Redis ``SET NX`` answers fast, the database backstops it.

A key is scoped to the user who sent it. While the first request is being served
its claim holds only the body's fingerprint and a short TTL (so a crashed web
process cannot wedge the key for a day); once the job row is committed the value
becomes ``fingerprint:job_id`` with the full TTL. Concurrent duplicates wait for
that value and answer with the same job. If Redis lost the key (flush, restart),
the unique (user, key) index on the job table catches the duplicate instead.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from django.conf import settings

from orchestrator_site.redis import key

PENDING_TTL_S = 30
WAIT_S = 10.0


class IdempotencyError(Exception):
    status = 422

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class KeyReusedWithDifferentBody(IdempotencyError):
    status = 422


class KeyInProgress(IdempotencyError):
    status = 409


def fingerprint(body: Any) -> str:
    """A stable hash of the request body as JSON (key order and spacing do not matter)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def redis_key(user_id: object, idempotency_key: str) -> str:
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]
    return key("idem", user_id, digest)


def ttl_s() -> int:
    return settings.IDEMPOTENCY_TTL_S


def parse(value: bytes | str) -> tuple[str, str | None]:
    """``fingerprint[:job_id]`` -> (fingerprint, job_id or None while pending)."""
    text = value.decode() if isinstance(value, bytes) else value
    fp, _, job_id = text.partition(":")
    return fp, job_id or None


def wait_for_job_id(client, rkey: str, fp: str) -> str | None:
    """Wait for the request holding the claim to commit; None when the claim vanished (owner failed)."""
    deadline = time.monotonic() + WAIT_S
    delay = 0.002
    while True:
        value = client.get(rkey)
        if value is None:
            return None
        held_fp, job_id = parse(value)
        if held_fp != fp:
            raise KeyReusedWithDifferentBody("This Idempotency-Key was already used with a different request body.")
        if job_id:
            return job_id
        if time.monotonic() > deadline:
            raise KeyInProgress("A request with this Idempotency-Key is still being processed; retry shortly.")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
