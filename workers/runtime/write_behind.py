"""Redis writes that may lag a moment: summed in the worker, sent in one pipeline every so often.

A finished job's fleet figures (``orchestrator_site.metrics``: counters and histogram buckets;
``dashboard.aggregates``: the per-minute hashes) are increments, about fifteen commands a job. A
thousand jobs' worth adds up to a few dozen ``HINCRBY``: the job threads add to this buffer (the
same calls a pipeline takes), and the worker's watcher flushes it every ``WORKER_WATCH_S`` and at
shutdown. The finished jobs' RQ hashes are deleted with the same flush.

What a ``kill -9`` loses: the figures of the last interval (the jobs themselves are in the
database). A flush that Redis refuses is dropped with a warning rather than retried, because a
pipeline can half-apply and a retry would count twice.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

from redis import Redis
from redis.exceptions import RedisError

from orchestrator_site.redis import redis_client

log = logging.getLogger(__name__)


class WriteBehind:
    """The pipeline methods the figures use (``hincrby``, ``hincrbyfloat``, ``expire``) plus ``delete``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._ints: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._floats: defaultdict[tuple[str, str], float] = defaultdict(float)
        self._expire: dict[str, int] = {}
        self._delete: set[str] = set()

    def hincrby(self, name: str, key: str, amount: int = 1) -> None:
        with self._lock:
            self._ints[(name, key)] += amount

    def hincrbyfloat(self, name: str, key: str, amount: float = 1.0) -> None:
        with self._lock:
            self._floats[(name, key)] += amount

    def expire(self, name: str, time: int) -> None:
        with self._lock:
            self._expire[name] = max(int(time), self._expire.get(name, 0))

    def delete(self, *names: str) -> None:
        with self._lock:
            self._delete.update(names)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ints) + len(self._floats) + len(self._expire) + len(self._delete)

    def flush(self, client: Redis | None = None) -> int:
        """Send what was buffered in one round trip; returns the number of commands sent."""
        with self._lock:
            ints, floats, expire, delete = self._ints, self._floats, self._expire, self._delete
            self._reset()
        n = len(ints) + len(floats) + len(expire) + (1 if delete else 0)
        if not n:
            return 0
        try:
            with (client or redis_client()).pipeline(transaction=False) as pipe:
                for (name, key), amount in ints.items():
                    pipe.hincrby(name, key, amount)
                for (name, key), amount in floats.items():
                    pipe.hincrbyfloat(name, key, amount)
                for name, ttl in expire.items():  # after the increments that may have created the key
                    pipe.expire(name, ttl)
                if delete:
                    pipe.delete(*delete)
                pipe.execute()
        except RedisError as exc:
            log.warning("buffered figures dropped: Redis refused the flush", extra={"commands": n, "error": str(exc)})
            return 0
        return n
