"""Worker liveness for crash recovery: each worker process keeps a short-lived key alive.

RQ's own worker key lives for minutes (worker_ttl 420 s), and RQ marks an abandoned job failed only
after its maintenance pass. Instead, every worker process refreshes ``llmo:worker-alive:<name>``
every ``WORKER_HEARTBEAT_S`` with a TTL of ``WORKER_LEASE_TTL_S`` from a daemon thread. A ``running``
job whose worker's key is gone was lost with that worker (SIGKILL, OOM, host down) and is re-queued
by the reconciler; a worker that is alive but slow keeps its key, so its jobs are never stolen.

The same thread runs the reconciler every ``RECONCILE_INTERVAL_S`` under a fleet-wide Redis lock, so
a deployment heals itself without a separate scheduler process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from django.conf import settings
from django.db import close_old_connections
from redis.exceptions import RedisError

from orchestrator_site.redis import key, redis_client

log = logging.getLogger(__name__)
RECONCILE_LOCK = key("reconcile", "lock")


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


class Heartbeat:
    """The daemon thread of one worker process: liveness key, and the periodic reconcile."""

    def __init__(self, worker_name: str, on_beat: Callable[[], None] | None = None) -> None:
        self.worker_name = worker_name
        self.on_beat = on_beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{worker_name}", daemon=True)
        self._since_reconcile = 0.0

    def start(self) -> None:
        beat(self.worker_name)  # alive before the first job can be claimed
        self._extras()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            redis_client().delete(alive_key(self.worker_name))
        except RedisError:
            pass

    def _loop(self) -> None:
        interval = float(settings.WORKER_HEARTBEAT_S)
        while not self._stop.wait(interval):
            try:
                beat(self.worker_name)
            except RedisError as exc:
                log.warning("heartbeat failed", extra={"worker": self.worker_name, "error": str(exc)})
                continue
            self._extras()
            self._since_reconcile += interval
            if settings.RECONCILE_INTERVAL_S and self._since_reconcile >= settings.RECONCILE_INTERVAL_S:
                self._since_reconcile = 0.0
                self._reconcile()

    def _extras(self) -> None:
        """The worker's own per-beat duties (slot leases, status); never fatal to the heartbeat."""
        if self.on_beat is None:
            return
        try:
            self.on_beat()
        except Exception as exc:
            log.warning("heartbeat duty failed", extra={"worker": self.worker_name, "error": str(exc)})

    def _reconcile(self) -> None:
        from workers.reconciler import reconcile

        lock_s = max(1, int(settings.RECONCILE_INTERVAL_S))
        try:
            if not redis_client().set(RECONCILE_LOCK, self.worker_name, nx=True, ex=lock_s):
                return  # another worker reconciles this interval
            reconcile()
        except Exception as exc:  # the heartbeat must survive a failed pass (Redis or DB blip)
            log.warning("reconcile pass failed", extra={"worker": self.worker_name, "error": str(exc)})
        finally:
            close_old_connections()
