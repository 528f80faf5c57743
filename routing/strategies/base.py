"""The plain data and helpers every routing strategy shares: a job's facts, a candidate backend, its
live figures, a ranking entry, the ``Strategy`` record, and parameter checks (no ORM, no Redis)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


@dataclass(frozen=True)
class JobFacts:
    """What routing may know about a job (no ORM object)."""

    priority: str = "normal"
    has_images: bool = False
    requires_multimodal: bool = False
    model: str = ""
    pinned_backend: str = ""
    prompt_tokens: int = 0
    max_tokens: int = 0
    # The backends the job's tenant may use (empty: any); routing never picks another.
    allowed_backends: tuple[str, ...] = ()
    # A stable identity for the job (its id, or its Idempotency-Key) so that a random
    # strategy picks the same backend when the same job is routed or replayed again.
    key: str = ""

    @property
    def needs_multimodal(self) -> bool:
        return self.has_images or self.requires_multimodal


@dataclass(frozen=True)
class Candidate:
    """A snapshot of one registered backend, as routing sees it."""

    name: str
    kind: str
    model: str = ""
    enabled: bool = True
    drained: bool = False  # an operator is draining it: no new jobs
    supports_multimodal: bool = False
    max_context_tokens: int = 8192
    max_concurrency: int = 16
    weight: int = 1
    cost_input_per_1k: Decimal = Decimal(0)
    cost_output_per_1k: Decimal = Decimal(0)
    pool: str = ""


@dataclass(frozen=True)
class BackendStats:
    """Live figures for one backend (kept in Redis by the workers; empty until they report)."""

    in_flight: int = 0
    ewma_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    error_rate: float = 0.0
    circuit_open: bool = False
    calls: int = 0  # calls in the sliding window behind p95 and error_rate
    last_error: str = ""
    last_error_at: float | None = None  # unix time
    circuit_state: str = "closed"


NO_STATS = BackendStats()


@dataclass(frozen=True)
class Ranked:
    """One backend's place in a ranking: lower ``score`` is better; ``reason`` shows the numbers."""

    name: str
    score: float
    reason: str


@dataclass(frozen=True)
class Strategy:
    name: str
    rank: Callable[[JobFacts, Sequence[Candidate], Mapping[str, BackendStats], Mapping[str, Any]], list[Ranked]]
    validate_params: Callable[[Mapping[str, Any]], None] = field(default=lambda params: None)
    description: str = ""


def check_params(params: Mapping[str, Any], allowed: set[str], strategy: str) -> None:
    """Reject parameters a strategy does not know: a typo must not silently change routing."""
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"unknown parameter(s) for {strategy}: {', '.join(sorted(unknown))}")


def positive_number(params: Mapping[str, Any], name: str, *, integer: bool = False) -> None:
    """``params[name]``, when present, must be a number > 0 (an int when ``integer``)."""
    if name not in params:
        return
    value = params[name]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise ValueError(f'"{name}" must be a positive {"integer" if integer else "number"}')
