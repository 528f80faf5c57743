"""``least_busy``: the backend with the smallest share of its capacity in use.

Utilisation = in_flight / max_concurrency; ties go to the backend with more free slots,
then by name. No params.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from routing.strategies.base import NO_STATS, BackendStats, Candidate, JobFacts, Ranked, Strategy, check_params


def validate_params(params: Mapping[str, Any]) -> None:
    check_params(params, set(), "least_busy")


def rank(
    job: JobFacts,
    candidates: Sequence[Candidate],
    stats: Mapping[str, BackendStats],
    params: Mapping[str, Any],
) -> list[Ranked]:
    rows: list[tuple[float, int, str, str]] = []
    for c in candidates:
        capacity = max(c.max_concurrency, 1)
        in_flight = stats.get(c.name, NO_STATS).in_flight
        load = in_flight / capacity
        free = capacity - in_flight
        rows.append((load, -free, c.name, f"{in_flight}/{capacity} in flight ({load:.0%} busy, {max(free, 0)} free)"))
    rows.sort()
    return [Ranked(name, load, reason) for load, _, name, reason in rows]


LEAST_BUSY = Strategy(name="least_busy", rank=rank, validate_params=validate_params, description=__doc__ or "")
