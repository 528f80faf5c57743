"""``cheapest``: the lowest expected cost for this job's tokens, optionally within a latency SLO.

Expected cost = prompt_tokens × cost_input_per_1k / 1000 + output × cost_output_per_1k / 1000,
where output is the job's ``max_tokens`` (the most it can cost) or, when the job sets none,
``expected_output_tokens`` (default 256).

Params (all optional): ``{"expected_output_tokens": 256, "max_p95_ms": 2000, "over_slo": "demote"}``.
With ``max_p95_ms``, a backend whose live p95 latency exceeds it is ranked after every backend
within the SLO (``over_slo: "demote"``, so it stays a fallback) or left out (``"exclude"``).
A backend with no latency figures yet counts as within the SLO: no evidence against it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
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

DEFAULT_OUTPUT_TOKENS = 256
OVER_SLO = ("demote", "exclude")


def validate_params(params: Mapping[str, Any]) -> None:
    check_params(params, {"expected_output_tokens", "max_p95_ms", "over_slo"}, "cheapest")
    positive_number(params, "expected_output_tokens", integer=True)
    positive_number(params, "max_p95_ms")
    if params.get("over_slo", "demote") not in OVER_SLO:
        raise ValueError('"over_slo" must be "demote" or "exclude"')


def expected_cost(job: JobFacts, c: Candidate, output_tokens: int) -> Decimal:
    return (c.cost_input_per_1k * job.prompt_tokens + c.cost_output_per_1k * output_tokens) / 1000


def rank(
    job: JobFacts,
    candidates: Sequence[Candidate],
    stats: Mapping[str, BackendStats],
    params: Mapping[str, Any],
) -> list[Ranked]:
    output = job.max_tokens or int(params.get("expected_output_tokens", DEFAULT_OUTPUT_TOKENS))
    slo = params.get("max_p95_ms")
    exclude = params.get("over_slo", "demote") == "exclude"
    rows: list[tuple[bool, Decimal, str, str]] = []
    for c in candidates:
        cost = expected_cost(job, c, output)
        reason = (
            f"expected cost {cost:.6f} = {job.prompt_tokens} in × {c.cost_input_per_1k}/1k"
            f" + {output} out × {c.cost_output_per_1k}/1k"
        )
        over = False
        if slo is not None:
            p95 = stats.get(c.name, NO_STATS).p95_latency_ms
            if p95 is None:
                reason += f"; p95 unknown, assumed within SLO {slo:g} ms"
            elif p95 > slo:
                if exclude:
                    continue
                over = True
                reason += f"; p95 {p95:.0f} ms > SLO {slo:g} ms, demoted"
            else:
                reason += f"; p95 {p95:.0f} ms ≤ SLO {slo:g} ms"
        rows.append((over, cost, c.name, reason))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    # Demoted backends score above every backend within the SLO, so "lower is better" still holds.
    top = max((float(r[1]) for r in rows), default=0.0) + 1.0
    return [Ranked(name, float(cost) + (top if over else 0.0), reason) for over, cost, name, reason in rows]


CHEAPEST = Strategy(name="cheapest", rank=rank, validate_params=validate_params, description=__doc__ or "")
