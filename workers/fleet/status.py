"""What each worker process says about itself, for the admin: one small Redis hash per worker.

``llmo:worker-status:<name>`` is written by the worker's heartbeat thread every
``WORKER_HEARTBEAT_S`` and expires after ``WORKER_LEASE_TTL_S``, so a killed worker disappears
from the list within seconds (RQ's own worker registry keeps a dead worker for minutes). The
index ``llmo:worker-status`` (a sorted set of names scored by expiry) lists them without a SCAN
of the keyspace, so reading the fleet costs the same however many other keys Redis holds.
GPU workers add their model, batch size and tokens/s in ``llmo:gpu-worker:<name>``
(:data:`GPU_STATUS_KEY`, :func:`publish_gpu`); :func:`read_workers` merges the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from redis.exceptions import RedisError

from orchestrator_site.redis import key, redis_client, reply_text

PREFIX = "worker-status"
INDEX = key(PREFIX)
GPU_STATUS_KEY = key("gpu-worker", "{name}")  # a small hash per GPU worker: model, batch sizes, tokens/s
GPU_STATUS_TTL_S = 120


def status_key(worker_name: str) -> str:
    return key(PREFIX, worker_name)


@dataclass
class WorkerReport:
    """One live worker process as the admin shows it (RQ's ``WorkerStatus`` is its idle/busy state)."""

    name: str
    host: str = ""
    pid: int = 0
    queues: list[str] = field(default_factory=list)
    state: str = ""  # idle | busy | stopping
    in_flight: int = 0
    max_concurrency: int = 1
    jobs_done: int = 0
    unwritten: int = 0  # finished jobs whose results wait for the database (an outage)
    started_at: str = ""
    updated_at: str = ""
    gpu: dict[str, Any] = field(default_factory=dict)  # models, batch_size, rounds, tokens_per_s


def publish(status: WorkerReport) -> None:
    """Write (and refresh the expiry of) one worker's status hash."""
    fields = {
        "name": status.name,
        "host": status.host,
        "pid": status.pid,
        "queues": ",".join(status.queues),
        "state": status.state,
        "in_flight": status.in_flight,
        "max_concurrency": status.max_concurrency,
        "jobs_done": status.jobs_done,
        "unwritten": status.unwritten,
        "started_at": status.started_at,
        "updated_at": status.updated_at,
    }
    ttl = max(1, int(settings.WORKER_LEASE_TTL_S))
    client = redis_client()
    secs, _ = client.time()
    pipe = client.pipeline(transaction=False)
    pipe.hset(status_key(status.name), mapping=fields)
    pipe.expire(status_key(status.name), ttl)
    pipe.zadd(INDEX, {status.name: secs + ttl})
    pipe.execute()


def remove(worker_name: str) -> None:
    pipe = redis_client().pipeline(transaction=False)
    pipe.delete(status_key(worker_name))
    pipe.zrem(INDEX, worker_name)
    pipe.execute()


def publish_gpu(worker_name: str, fields: dict[str, Any]) -> None:
    """Write a GPU worker's own figures (models, last batch, tokens/s). A Redis hiccup loses them
    until the next round writes them again: the admin's view must never stop a batch."""
    key_ = GPU_STATUS_KEY.format(name=worker_name)
    try:
        pipe = redis_client().pipeline(transaction=False)
        pipe.hset(key_, mapping=fields)
        pipe.expire(key_, GPU_STATUS_TTL_S)
        pipe.execute()
    except RedisError:
        pass


def _int(raw: Any) -> int:
    try:
        return int(float(reply_text(raw)))
    except ValueError:
        return 0


def read_workers() -> list[WorkerReport]:
    """Every worker whose status has not expired, sorted by name (three round trips)."""
    client = redis_client()
    secs, _ = client.time()
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebyscore(INDEX, "-inf", secs)  # workers that stopped publishing
    pipe.zrange(INDEX, 0, -1)
    names = sorted(reply_text(n) for n in pipe.execute()[1])
    if not names:
        return []
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(status_key(name))
        pipe.hgetall(GPU_STATUS_KEY.format(name=name))
    replies = pipe.execute()
    workers = []
    for name, raw, gpu_raw in zip(names, replies[0::2], replies[1::2], strict=True):
        if not raw:
            continue  # expired between the scan and the read
        h = {reply_text(k): reply_text(v) for k, v in raw.items()}
        gpu: dict[str, Any] = {reply_text(k): reply_text(v) for k, v in (gpu_raw or {}).items()}
        if "models" in gpu:
            try:
                gpu["models"] = json.loads(gpu["models"])
            except ValueError:
                gpu["models"] = []
        workers.append(
            WorkerReport(
                name=name,
                host=h.get("host", ""),
                pid=_int(h.get("pid")),
                queues=[q for q in h.get("queues", "").split(",") if q],
                state=h.get("state", ""),
                in_flight=_int(h.get("in_flight")),
                max_concurrency=_int(h.get("max_concurrency")) or 1,
                jobs_done=_int(h.get("jobs_done")),
                unwritten=_int(h.get("unwritten")),
                started_at=h.get("started_at", ""),
                updated_at=h.get("updated_at", ""),
                gpu=gpu,
            )
        )
    return workers
