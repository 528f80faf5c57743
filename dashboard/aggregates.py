"""The dashboard's figures, aggregated in Redis as jobs finish, so the page never scans the jobs table.

Workers call :func:`record` once per finished run (from ``workers.execution.run_figures``),
adding a few commands to the pipeline that call already sends: no extra round trip. Keys, all
expiring on their own:

- ``llmo:dash:n:<epoch minute>`` hash ``<backend>:<state>`` -> jobs that reached ``state``
  (succeeded | failed | canceled | expired) in that minute; kept 2 h. Sixty small reads draw the
  per-minute throughput chart.
- ``llmo:dash:h:<epoch minute // 5>`` hash, latency histograms of the jobs that finished in those
  five minutes; kept 2 h:

  - ``w:<backend>:<bucket>`` queue wait (``started_at - enqueued_at``) of every started job;
  - ``x:<backend>:<bucket>`` execution (``finished_at - started_at``) of succeeded jobs only:
    a backend that fails fast must not look fast (as in ``routing.stats``).

  Five-minute slots rather than minutes: the hour's percentiles merge 12 hashes instead of 60 (the
  read is dominated by parsing the reply), and the p95-over-time chart wants 5-minute points anyway.
- ``llmo:dash:cost:<YYYY-MM-DD>`` hash backend -> cost of the jobs that finished that day
  (``TIME_ZONE``); kept 2 days.

Percentiles come from fixed log buckets, twenty per decade from 1 ms to 10,000 s, with linear
interpolation inside a bucket (as Prometheus' ``histogram_quantile``): a figure is within one bucket
of the exact sample percentile (at most 12% off), and merging slots is adding counters.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from django.utils import timezone

from orchestrator_site.redis import key

if TYPE_CHECKING:
    from redis.client import Pipeline

    from workers.execution.run_facts import RunFacts

log = logging.getLogger(__name__)

WINDOW_MIN = 60  # throughput: the last 60 minutes
SLOT_MIN = 5  # latency: 5-minute slots
WINDOW_SLOTS = WINDOW_MIN // SLOT_MIN  # the current slot and the 11 before it: the last 55-60 minutes
TTL_S = 2 * 3600
DAY_TTL_S = 2 * 24 * 3600
# Upper bounds in seconds: 10 ** (i/20 - 3), i = 0..140, i.e. 1 ms .. 10,000 s; one overflow bucket above.
# Only non-empty buckets are stored, so the resolution costs little for latencies that cluster.
BUCKETS_PER_DECADE = 20
BOUNDS_S: tuple[float, ...] = tuple(10 ** (i / BUCKETS_PER_DECADE - 3) for i in range(7 * BUCKETS_PER_DECADE + 1))
N_BUCKETS = len(BOUNDS_S) + 1
STATES = ("succeeded", "failed", "canceled", "expired")
NO_BACKEND = "-"


def count_key(minute: int) -> str:
    return key("dash", "n", minute)


def hist_key(slot: int) -> str:
    return key("dash", "h", slot)


def cost_key(day: date) -> str:
    return key("dash", "cost", day.isoformat())


def bucket_index(seconds: float) -> int:
    """The first bucket whose upper bound is >= ``seconds`` (the overflow bucket past the last)."""
    return bisect_left(BOUNDS_S, max(float(seconds), 0.0))


def epoch_minute(at: datetime) -> int:
    return int(at.timestamp() // 60)


def record(pipe: Pipeline, run: RunFacts) -> None:
    """Queue this run's figures on ``pipe`` (the caller executes it). Never raises: a figure lost
    must not fail or re-run a job."""
    try:
        _record(pipe, run)
    except Exception as exc:
        log.warning("dashboard figures not recorded", extra={"job_id": run.job_id, "error": repr(exc)})


def count_final(pipe: Pipeline, backend: str, state: str, at: datetime) -> None:
    """One job of ``backend`` reached ``state`` at ``at`` (a run's end, or an expiry that had no run)."""
    ckey = count_key(epoch_minute(at))
    pipe.hincrby(ckey, f"{backend}:{state}", 1)
    pipe.expire(ckey, TTL_S)


def _record(pipe: Pipeline, run: RunFacts) -> None:
    if not run.finished_in_run or run.finished_at is None:
        return  # re-queued for a retry, or a duplicate delivery: counted when it ends
    backend = run.backend or NO_BACKEND
    minute = epoch_minute(run.finished_at)
    hkey = hist_key(minute // SLOT_MIN)
    count_final(pipe, backend, run.state, run.finished_at)
    if run.started_at is not None:
        if run.enqueued_at is not None:
            wait = (run.started_at - run.enqueued_at).total_seconds()
            pipe.hincrby(hkey, f"w:{backend}:{bucket_index(wait)}", 1)
        if run.state == "succeeded":
            execution = (run.finished_at - run.started_at).total_seconds()
            pipe.hincrby(hkey, f"x:{backend}:{bucket_index(execution)}", 1)
        pipe.expire(hkey, TTL_S)
    if run.cost:
        dkey = cost_key(timezone.localdate(run.finished_at))
        pipe.hincrbyfloat(dkey, backend, float(run.cost))
        pipe.expire(dkey, DAY_TTL_S)


# --- reading ----------------------------------------------------------------------------------------
def quantile(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) in seconds of a histogram over :data:`BOUNDS_S`; None when empty.

    Linear interpolation inside the bucket that holds the rank; the overflow bucket answers its
    lower bound (the largest value the histogram can tell).
    """
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    for i, n in enumerate(counts):
        if n and cumulative + n >= rank:
            if i >= len(BOUNDS_S):
                return BOUNDS_S[-1]
            lower = BOUNDS_S[i - 1] if i else 0.0
            return lower + (BOUNDS_S[i] - lower) * max(rank - cumulative, 0) / n
        cumulative += n
    return BOUNDS_S[-1]


def _empty_hist() -> list[int]:
    return [0] * N_BUCKETS


@dataclass
class BackendWindow:
    """One backend's figures over the window."""

    per_minute: dict[str, list[int]]  # state -> count per minute, oldest first
    wait: list[int] = field(default_factory=_empty_hist)  # histogram over the whole window
    execution: list[int] = field(default_factory=_empty_hist)
    execution_slots: list[list[int]] = field(default_factory=list)  # one histogram per slot, oldest first

    def total(self, state: str) -> int:
        return sum(self.per_minute.get(state, ()))


@dataclass
class Window:
    """The last hour of finished jobs, per backend, plus today's cost."""

    minutes: list[int]  # epoch minutes, oldest first; the last one is the current (partial) minute
    backends: dict[str, BackendWindow]
    cost_today: dict[str, float]

    def per_minute(self, state: str) -> list[int]:
        """All backends together."""
        out = [0] * len(self.minutes)
        for b in self.backends.values():
            for i, n in enumerate(b.per_minute.get(state, ())):
                out[i] += n
        return out


def queue_read(pipe: Pipeline, now: datetime | None = None) -> Callable[[list[Any]], Window]:
    """Add the window's reads to ``pipe`` (:data:`WINDOW_MIN` + :data:`WINDOW_SLOTS` + 1 commands);
    returns the parser of their replies, which the caller slices out of ``pipe.execute()`` in order."""
    now = now or timezone.now()
    last = epoch_minute(now)
    minutes = list(range(last - WINDOW_MIN + 1, last + 1))
    slots = list(range(last // SLOT_MIN - WINDOW_SLOTS + 1, last // SLOT_MIN + 1))
    for m in minutes:
        pipe.hgetall(count_key(m))
    for s in slots:
        pipe.hgetall(hist_key(s))
    pipe.hgetall(cost_key(timezone.localdate(now)))
    return lambda replies: _parse(minutes, len(slots), replies)


def _parse(minutes: list[int], n_slots: int, replies: list[Any]) -> Window:
    n_min = len(minutes)
    backends: dict[str, BackendWindow] = {}

    def backend(name: str) -> BackendWindow:
        b = backends.get(name)
        if b is None:
            b = backends[name] = BackendWindow(
                per_minute={s: [0] * n_min for s in STATES},
                execution_slots=[_empty_hist() for _ in range(n_slots)],
            )
        return b

    for i, raw in enumerate(replies[:n_min]):
        for fld, value in raw.items():
            name, _, state = fld.decode().rpartition(":")
            backend(name).per_minute.setdefault(state, [0] * n_min)[i] += int(value)
    for i, raw in enumerate(replies[n_min : n_min + n_slots]):
        for fld, value in raw.items():
            kind, name, bucket = fld.decode().split(":", 2)
            b, index, n = backend(name), min(int(bucket), N_BUCKETS - 1), int(value)
            if kind == "w":
                b.wait[index] += n
            elif kind == "x":
                b.execution[index] += n
                b.execution_slots[i][index] += n
    cost_raw = replies[n_min + n_slots] if len(replies) > n_min + n_slots else {}
    cost = {k.decode(): float(v) for k, v in cost_raw.items()}
    return Window(minutes=minutes, backends=backends, cost_today=cost)
