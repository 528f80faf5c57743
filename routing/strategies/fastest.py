"""``fastest``: the lowest expected latency, counting the queue a job would wait in.

Expected latency = base × (1 + in_flight / max_concurrency), where base is the backend's
EWMA latency (``"latency": "ewma"``, the default) or its p95 over the recent window
(``"latency": "p95"``). A backend already at its concurrency limit so pays at least double:
the penalty grows with the work ahead of the job, as in an M/M/c queue's waiting time.

A backend without latency figures yet is assumed to be as fast as the median of those that
have them (so new backends get traffic, and learn a figure, without being preferred blindly),
or ``unknown_latency_ms`` when that param is set. When no backend has figures, all are equal
on latency and the queueing factor alone decides.

Params (all optional): ``{"latency": "ewma" | "p95", "unknown_latency_ms": 500}``.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from routing.strategies.base import (
    NO_STATS,
    BackendStats,
    Candidate,
    JobFacts,
    Ranked,
    Strategy,
    check_params,
    positive_number,
)

NEUTRAL_MS = 1000.0  # the base when no backend has figures: only the queueing factor matters


def validate_params(params: Mapping[str, Any]) -> None:
    check_params(params, {"latency", "unknown_latency_ms"}, "fastest")
    if params.get("latency", "ewma") not in ("ewma", "p95"):
        raise ValueError('"latency" must be "ewma" or "p95"')
    positive_number(params, "unknown_latency_ms")


def rank(
    job: JobFacts,
    candidates: Sequence[Candidate],
    stats: Mapping[str, BackendStats],
    params: Mapping[str, Any],
) -> list[Ranked]:
    measure = params.get("latency", "ewma")

    def observed(c: Candidate) -> float | None:
        s = stats.get(c.name, NO_STATS)
        return s.p95_latency_ms if measure == "p95" else s.ewma_latency_ms

    known = [v for v in map(observed, candidates) if v is not None]
    if "unknown_latency_ms" in params:
        fallback, fallback_why = float(params["unknown_latency_ms"]), "unknown_latency_ms"
    elif known:
        fallback, fallback_why = statistics.median(known), "median of known"
    else:
        fallback, fallback_why = NEUTRAL_MS, "no backend has figures yet"

    rows: list[tuple[float, str, str]] = []
    for c in candidates:
        base = observed(c)
        in_flight = stats.get(c.name, NO_STATS).in_flight
        factor = 1.0 + in_flight / max(c.max_concurrency, 1)
        if base is None:
            base_text = f"{measure} unknown, assumed {fallback:.0f} ms ({fallback_why})"
            base = fallback
        else:
            base_text = f"{measure} {base:.0f} ms"
        expected = base * factor
        reason = f"expected {expected:.0f} ms = {base_text} × (1 + {in_flight}/{c.max_concurrency} in flight)"
        rows.append((expected, c.name, reason))
    rows.sort()
    return [Ranked(name, expected, reason) for expected, name, reason in rows]


FASTEST = Strategy(name="fastest", rank=rank, validate_params=validate_params, description=__doc__ or "")
