"""``ordered``: the first eligible backend in the operator's order; the rest are the fallback chain.

Params: ``{"order": ["backend-a", "backend-b"]}``. Eligible backends missing from the
list follow, by name, so a newly registered backend is still a last resort.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from routing.strategies.base import BackendStats, Candidate, JobFacts, Ranked, Strategy, check_params


def validate_params(params: Mapping[str, Any]) -> None:
    order = params.get("order", [])
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
        raise ValueError('"order" must be a list of backend names')
    check_params(params, {"order"}, "ordered")


def rank(
    job: JobFacts,
    candidates: Sequence[Candidate],
    stats: Mapping[str, BackendStats],
    params: Mapping[str, Any],
) -> list[Ranked]:
    order = list(params.get("order", []))
    position = {name: i for i, name in enumerate(order)}
    listed = sorted((c for c in candidates if c.name in position), key=lambda c: position[c.name])
    rest = sorted((c for c in candidates if c.name not in position), key=lambda c: c.name)
    ranked = [Ranked(c.name, float(i), f"position {position[c.name] + 1} in order") for i, c in enumerate(listed)]
    ranked += [Ranked(c.name, float(len(order) + i), "not in order; by name") for i, c in enumerate(rest)]
    return ranked


ORDERED = Strategy(name="ordered", rank=rank, validate_params=validate_params, description=__doc__ or "")
