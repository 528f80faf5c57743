"""A per-process snapshot of the backend registry and the active policy.

Routing runs on every ``POST /jobs``, so it must not query the database each time.
Each process keeps a snapshot tagged with the value of a Redis version key; any
change to a backend or a policy (admin, API, shell) replaces that key after the
transaction commits, and the next routing decision in every process sees a new
tag and reloads. A random token rather than a counter: after a Redis flush the
key is recreated with a fresh token, so no process can mistake an old snapshot
for the current one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from django.db import transaction
from redis.exceptions import RedisError

from orchestrator_site.redis import key, redis_client
from routing.models import Backend, RoutingPolicy
from routing.strategies import Candidate

log = logging.getLogger(__name__)
VERSION_KEY = key("routing", "version")
# "<host>:<pid>" -> "<token> <unix time>": which registry each process loaded, and when.
# Lets a test (or an operator with redis-cli) see that a change reached every process; one write per reload.
LOADED_KEY = key("routing", "loaded")
LOADED_TTL_S = 24 * 3600


@dataclass(frozen=True)
class PolicySnapshot:
    id: int
    name: str
    strategy: str
    params: dict
    version: int


@dataclass(frozen=True)
class Snapshot:
    token: str
    policy: PolicySnapshot | None
    candidates: tuple[Candidate, ...]
    backends: dict[str, Backend]


_lock = threading.Lock()
_snapshot: Snapshot | None = None


def invalidate() -> None:
    """Tell every process to reload the registry, once the current transaction commits."""
    transaction.on_commit(lambda: redis_client().set(VERSION_KEY, uuid.uuid4().hex))


def ensure_token(token: bytes | str | None) -> str:
    """Turn the value read from Redis into a token, creating the key if a flush removed it."""
    if token is None:
        fresh = uuid.uuid4().hex
        redis_client().set(VERSION_KEY, fresh, nx=True)
        token = redis_client().get(VERSION_KEY) or fresh
    return token.decode() if isinstance(token, bytes) else token


def last() -> Snapshot | None:
    """The snapshot this process loaded last, without asking Redis whether it is still current."""
    return _snapshot


def snapshot(token: str) -> Snapshot:
    """The registry as of ``token``; reloads from the database when the token changed."""
    global _snapshot
    current = _snapshot
    if current is not None and current.token == token:
        return current
    with _lock:
        if _snapshot is None or _snapshot.token != token:
            _snapshot = _load(token)
            log.info("routing registry reloaded", extra={"event_kind": "routing.reload", "token": token})
            _note_loaded(token)
        return _snapshot


def _note_loaded(token: str) -> None:
    try:
        pipe = redis_client().pipeline(transaction=False)
        pipe.hset(LOADED_KEY, f"{socket.gethostname()}:{os.getpid()}", f"{token} {time.time():.6f}")
        pipe.expire(LOADED_KEY, LOADED_TTL_S)
        pipe.execute()
    except RedisError as exc:  # bookkeeping only; the snapshot itself is fine
        log.warning("could not record the registry reload", extra={"error": str(exc)})


def loaded_by_process() -> dict[str, tuple[str, float]]:
    """Which registry token each process last loaded, and when (unix time)."""
    out = {}
    for proc, value in redis_client().hgetall(LOADED_KEY).items():
        token, at = value.decode().split(" ", 1)
        out[proc.decode()] = (token, float(at))
    return out


def _load(token: str) -> Snapshot:
    backends = {b.name: b for b in Backend.objects.all()}
    policy = RoutingPolicy.objects.filter(is_active=True).first()
    return Snapshot(
        token=token,
        policy=PolicySnapshot(policy.pk, policy.name, policy.strategy, dict(policy.params), policy.version)
        if policy
        else None,
        candidates=tuple(to_candidate(b) for b in backends.values()),
        backends=backends,
    )


def to_candidate(backend: Backend) -> Candidate:
    return Candidate(
        name=backend.name,
        kind=backend.kind,
        model=backend.model,
        enabled=backend.enabled,
        drained=backend.drain,
        supports_multimodal=backend.supports_multimodal,
        max_context_tokens=backend.max_context_tokens,
        max_concurrency=backend.max_concurrency,
        weight=backend.weight,
        cost_input_per_1k=backend.cost_input_per_1k,
        cost_output_per_1k=backend.cost_output_per_1k,
        pool=backend.pool,
    )
