"""``weighted``: a random backend, each chosen with probability proportional to its weight.

The whole ranking is a weighted random order without replacement (Efraimidis–Spirakis:
sort by u^(1/w)), so the fallback chain is random by weight too; weight-0 backends come
last, by name, as a fallback only.

Params (all optional): ``{"weights": {"backend": 3}, "seed": 42}``. ``weights`` overrides a
backend's registered weight. The draw is deterministic when the job carries a key (its id or
Idempotency-Key): the same job, re-routed or replayed in a simulation, gets the same backend.
``seed`` makes it deterministic for keyless jobs too (tests), and reshuffles keyed ones.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from routing.strategies.base import BackendStats, Candidate, JobFacts, Ranked, Strategy, check_params

_system = random.SystemRandom()


def validate_params(params: Mapping[str, Any]) -> None:
    check_params(params, {"weights", "seed"}, "weighted")
    weights = params.get("weights", {})
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in weights.items()
    ):
        raise ValueError('"weights" must map backend names to integers ≥ 0')
    seed = params.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | str)):
        raise ValueError('"seed" must be an integer or a string')


def rng_for(job: JobFacts, params: Mapping[str, Any]) -> random.Random:
    """Seeded by (seed, job key) when either is set; otherwise the system's entropy."""
    seed = params.get("seed")
    if seed is None and not job.key:
        return _system
    return random.Random(f"{seed}:{job.key}")


def rank(
    job: JobFacts,
    candidates: Sequence[Candidate],
    stats: Mapping[str, BackendStats],
    params: Mapping[str, Any],
) -> list[Ranked]:
    overrides = params.get("weights", {})
    weight = {c.name: int(overrides.get(c.name, c.weight)) for c in candidates}
    total = sum(weight.values())
    rng = rng_for(job, params)
    # Sort candidates by name first so the draw does not depend on the registry's order.
    drawn: list[tuple[float, str]] = []
    zero: list[str] = []
    for c in sorted(candidates, key=lambda c: c.name):
        w = weight[c.name]
        if w > 0:
            drawn.append((rng.random() ** (1.0 / w), c.name))
        else:
            zero.append(c.name)
    drawn.sort(reverse=True)
    ranked = [
        Ranked(name, float(i), f"weight {weight[name]} of {total} ({weight[name] / total:.0%} chance); draw #{i + 1}")
        for i, (_, name) in enumerate(drawn)
    ]
    ranked += [Ranked(name, float(len(drawn) + i), "weight 0: fallback only") for i, name in enumerate(zero)]
    return ranked


WEIGHTED = Strategy(name="weighted", rank=rank, validate_params=validate_params, description=__doc__ or "")
