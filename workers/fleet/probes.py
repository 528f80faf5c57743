"""Periodic health probes: every enabled network backend is probed and a down answer feeds its circuit.

A probe that finds a backend down (unreachable, 5xx, a model still loading) counts as a failed call
for the breaker, so a dead backend's circuit opens before jobs have to fail on it, and routing skips it.
A healthy answer is not folded in: successes of cheap probes would dilute the error rate that real
calls build, and an open circuit closes through its half-open trial with real traffic. An ``error``
answer (a wrong key, a missing model) is a configuration problem, not an outage: shown, not counted.
The last answer is kept in Redis (``llmo:probe:<name>``) for operators.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.utils import timezone
from redis.exceptions import RedisError

from orchestrator_site.redis import key, redis_client
from routing import circuit
from routing.circuit import CircuitConfig
from routing.models import Backend, BackendKind
from workers.backends.health import ProbeResult, probe

log = logging.getLogger(__name__)
PROBED_KINDS = (BackendKind.OLLAMA, BackendKind.OPENAI)
DOWN_STATUSES = {"down", "loading"}
PROBE_TTL_S = 24 * 3600


@dataclass(frozen=True)
class ProbeOutcome:
    backend: str
    result: ProbeResult
    circuit_state: str


def probe_key(name: str) -> str:
    return key("probe", name)


def probe_backends(*, timeout_s: float = 5.0) -> list[ProbeOutcome]:
    """Probe every enabled Ollama/OpenAI-compatible backend once and record what was found."""
    outcomes = []
    for backend in Backend.objects.filter(enabled=True, kind__in=PROBED_KINDS).order_by("name"):
        result = probe(backend.adapter_config(), timeout_s=timeout_s)
        outcomes.append(ProbeOutcome(backend.name, result, _record(backend, result)))
    return outcomes


def _record(backend: Backend, result: ProbeResult) -> str:
    try:
        if result.status in DOWN_STATUSES:
            state = circuit.record(
                backend.name,
                ok=False,
                config=CircuitConfig.from_config(backend.config),
                error=f"health probe: {result.status}: {result.detail}",
            )
        else:
            state = circuit.status(backend.name).state
        redis_client().hset(
            probe_key(backend.name),
            mapping={
                "status": result.status,
                "detail": result.detail[:500],
                "latency_ms": result.latency_ms,
                "at": timezone.now().isoformat(),
            },
        )
        redis_client().expire(probe_key(backend.name), PROBE_TTL_S)
    except RedisError as exc:
        log.warning("probe result not recorded", extra={"backend": backend.name, "error": str(exc)})
        return "unknown"
    log.info(
        "backend probed",
        extra={"backend": backend.name, "status": result.status, "latency_ms": result.latency_ms, "circuit": state},
    )
    return state
