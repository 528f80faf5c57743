"""Formatting for the dashboard's numbers: durations, ages, rates and a GPU worker's summary."""

from __future__ import annotations

from typing import Any

from django import template

from dashboard.charts import fmt_seconds

register = template.Library()


@register.filter
def seconds(value: float | None) -> str:
    """``0.85`` -> ``850 ms``; None -> ``—``."""
    return fmt_seconds(value)


@register.filter
def ms(value: float | None) -> str:
    """Milliseconds (as routing.stats keeps them) shown like any other duration."""
    return "—" if value is None else fmt_seconds(value / 1000)


@register.filter
def age(value: float | None) -> str:
    """A compact age: ``12 s``, ``5 min``, ``3 h``, ``2 d``."""
    if value is None:
        return "—"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if value >= size:
            return f"{value // size:.0f} {unit}"
    return f"{value:.0f} s"


@register.filter
def percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


@register.filter
def gpu_summary(gpu: dict[str, Any] | None) -> str:
    """Models, last batch size and tokens/s of a GPU worker; empty for a worker without one."""
    if not gpu:
        return ""
    parts = []
    models = gpu.get("models") or []
    names = [m.get("path", "?") if isinstance(m, dict) else str(m) for m in models]
    if names:
        parts.append(", ".join(names))
    if gpu.get("batch_size") not in (None, ""):
        parts.append(f"batch {gpu['batch_size']}")
    if gpu.get("tokens_per_s") not in (None, ""):
        parts.append(f"{gpu['tokens_per_s']} tokens/s")
    return " · ".join(parts)
