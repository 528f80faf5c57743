"""Worker liveness keys: each worker process keeps a short-lived key alive; recovery reads them.

RQ's own worker key lives for minutes (worker_ttl 420 s). Instead, every worker process refreshes
``llmo:worker-alive:<name>`` every ``WORKER_HEARTBEAT_S`` with a TTL of ``WORKER_LEASE_TTL_S``
(``workers.fleet.heartbeat``). A ``running`` job whose worker's key is gone was lost with that
worker (SIGKILL, OOM, host down) and is re-queued by ``workers.fleet.reconciler``; a worker that is
alive but slow keeps its key, so its jobs are never stolen. ``llmo:worker-seen:<name>`` outlives the
alive key, so an expiry is told apart from a Redis that lost both.
"""

from __future__ import annotations

from django.conf import settings

from orchestrator_site.redis import key, redis_client


def alive_key(worker_name: str) -> str:
    return key("worker-alive", worker_name)


def seen_key(worker_name: str) -> str:
    return key("worker-seen", worker_name)


def beat(worker_name: str) -> None:
    """Refresh the liveness key; ``worker-seen`` outlives it, so its expiry is told from a Redis that lost both."""
    pipe = redis_client().pipeline(transaction=False)
    pipe.set(alive_key(worker_name), "1", ex=max(1, int(settings.WORKER_LEASE_TTL_S)))
    pipe.set(seen_key(worker_name), "1", ex=24 * 3600)
    pipe.execute()


def alive(worker_names: list[str]) -> dict[str, bool]:
    """Which of these workers still hold their liveness key (one round trip)."""
    if not worker_names:
        return {}
    pipe = redis_client().pipeline(transaction=False)
    for name in worker_names:
        pipe.exists(alive_key(name))
    return {name: bool(found) for name, found in zip(worker_names, pipe.execute(), strict=True)}


def end(worker_name: str) -> None:
    """A worker that stops cleanly drops its key: its jobs are already handed back."""
    redis_client().delete(alive_key(worker_name))
