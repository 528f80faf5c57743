"""Routing strategies: pure functions from (job, candidates, stats, params) to a ranking.

A strategy never touches the ORM or Redis, so it is trivially unit-tested and can be
replayed over past traffic. Adding one is one module with a ``Strategy`` instance (built
from the types in ``routing.strategies.base``) and a line in ``STRATEGIES`` below.
"""

from __future__ import annotations

from routing.strategies.base import BackendStats, Candidate, JobFacts, Strategy
from routing.strategies.cheapest import CHEAPEST
from routing.strategies.fastest import FASTEST
from routing.strategies.least_busy import LEAST_BUSY
from routing.strategies.ordered import ORDERED
from routing.strategies.weighted import WEIGHTED

# What callers outside the package use; a strategy module imports ``routing.strategies.base``.
__all__ = ["STRATEGIES", "BackendStats", "Candidate", "JobFacts", "Strategy", "get_strategy", "strategy_choices"]

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (ORDERED, CHEAPEST, FASTEST, WEIGHTED, LEAST_BUSY)}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise KeyError(f"Unknown routing strategy {name!r}; known: {known}") from None


def strategy_choices() -> list[tuple[str, str]]:
    return [(name, name) for name in sorted(STRATEGIES)]
