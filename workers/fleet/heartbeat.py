"""The heartbeat thread of a worker process: its liveness key (``workers.fleet.liveness``) and duties.

RQ marks an abandoned job failed only after its maintenance pass; our recovery reads the liveness
key this thread refreshes every ``WORKER_HEARTBEAT_S`` instead, so a killed worker's jobs are
recovered in seconds. Each beat also runs the worker's own duties (slot leases, its status).

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
from workers.fleet import liveness
from workers.fleet.reconciler import reconcile

log = logging.getLogger(__name__)
RECONCILE_LOCK = key("reconcile", "lock")


class Heartbeat:
    """The daemon thread of one worker process: liveness key, and the periodic reconcile."""

    def __init__(self, worker_name: str, on_beat: Callable[[], None] | None = None) -> None:
        self.worker_name = worker_name
        self.on_beat = on_beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{worker_name}", daemon=True)
        self._since_reconcile = 0.0

    def start(self) -> None:
        liveness.beat(self.worker_name)  # alive before the first job can be claimed
        self._extras()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            liveness.end(self.worker_name)
        except RedisError:
            pass

    def _loop(self) -> None:
        interval = float(settings.WORKER_HEARTBEAT_S)
        while not self._stop.wait(interval):
            try:
                liveness.beat(self.worker_name)
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
        lock_s = max(1, int(settings.RECONCILE_INTERVAL_S))
        try:
            if not redis_client().set(RECONCILE_LOCK, self.worker_name, nx=True, ex=lock_s):
                return  # another worker reconciles this interval
            reconcile()
        except Exception as exc:  # the heartbeat must survive a failed pass (Redis or DB blip)
            log.warning("reconcile pass failed", extra={"worker": self.worker_name, "error": str(exc)})
        finally:
            close_old_connections()
