"""Audited writes to the backend registry, from the admin or the API.

Each change commits together with its audit entry (``audit.AuditEntry``): who, from where, and
field by field what changed. The API key is compared but never written to the log: the entry
says only that it was set, changed or cleared. Saving a row also tells every process to reload
its routing snapshot (``routing.signals``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.db import transaction
from redis.exceptions import RedisError

from audit import log
from audit.models import AuditEntry
from routing import circuit
from routing.models import Backend

AUDITED_FIELDS = (
    "name",
    "kind",
    "enabled",
    "drain",
    "base_url",
    "model",
    "api_key",
    "supports_multimodal",
    "max_context_tokens",
    "max_concurrency",
    "weight",
    "timeout_s",
    "pool",
    "cost_input_per_1k",
    "cost_output_per_1k",
    "config",
)
SECRET_FIELDS = ("api_key",)

# (field, value) -> the action an operator took; one verb per switch, so the log filters by it.
SWITCHES = {
    ("enabled", True): "enable",
    ("enabled", False): "disable",
    ("drain", True): "drain",
    ("drain", False): "undrain",
    ("supports_multimodal", True): "set_multimodal",
    ("supports_multimodal", False): "unset_multimodal",
}


def state(backend: Backend) -> dict[str, Any]:
    """The audited fields as JSON values. Holds the raw API key: compare it, never store it
    (:func:`audit.log.diff` records secrets as changed only)."""
    out: dict[str, Any] = {}
    for name in AUDITED_FIELDS:
        value = getattr(backend, name)
        if name.startswith("cost_"):
            value = f"{value:f}"
        elif name == "base_url":
            value = _without_credentials(value)
        out[name] = value
    return out


def save(backend: Backend, *, user=None, source: str) -> AuditEntry | None:
    """Create ``backend`` (no primary key yet) or store the edits made to it, with an entry naming
    each changed field; an edit that changed nothing writes no entry."""
    with transaction.atomic():
        if backend.pk is None:
            before: dict[str, Any] = {}
            action = "create"
        else:
            before = state(Backend.objects.select_for_update().get(pk=backend.pk))
            action = "update"
        backend.save()
        # Read back what the database holds, so decimals compare in their stored precision.
        changes = log.diff(before, state(Backend.objects.get(pk=backend.pk)), secrets=SECRET_FIELDS)
        if action == "update" and not changes:
            return None
        return log.record(backend, action, user=user, source=source, changes=changes)


def delete(backend: Backend, *, user=None, source: str) -> AuditEntry:
    """Delete ``backend``; the entry keeps its last settings (the key only as set or not)."""
    with transaction.atomic():
        changes = log.diff(state(backend), {}, secrets=SECRET_FIELDS)
        entry = log.record(backend, "delete", user=user, source=source, changes=changes)
        backend.delete()
        return entry


def switch(backend: Backend, field: str, value: bool, *, user=None, source: str) -> bool:
    """Set one of the operator's switches (enabled, drain, supports_multimodal); False when the
    stored row already had ``value`` (nothing written, no entry)."""
    action = SWITCHES[(field, value)]
    with transaction.atomic():
        stored = Backend.objects.select_for_update().get(pk=backend.pk)
        old = getattr(stored, field)
        if old == value:
            return False
        setattr(stored, field, value)
        stored.save(update_fields=[field, "updated_at"])  # save(), not update(): invalidates routing
        setattr(backend, field, value)
        log.record(stored, action, user=user, source=source, changes={field: [old, value]})
    return True


def close_circuit(backend: Backend, *, user=None, source: str) -> AuditEntry:
    """Close the backend's circuit (the operator knows it is back) and log from which state."""
    try:
        previous = circuit.status(backend.name).state
    except RedisError:
        previous = None  # the reset below will say whether Redis is really gone
    who = user.get_username() if user is not None and getattr(user, "is_authenticated", False) else "an operator"
    circuit.reset(backend.name, reason=f"closed by {who} in the {source}")
    return log.record(backend, "close_circuit", user=user, source=source, changes={"circuit": [previous, "closed"]})


def record_probe(backend: Backend, summary: str, *, user=None, source: str) -> AuditEntry:
    """Log that an operator probed the backend and what came back, as a status summary only
    (never a foreign server's body)."""
    return log.record(backend, "probe", user=user, source=source, detail=summary)


def _without_credentials(url: str) -> str:
    """``base_url`` with any ``user:password@`` masked, so the log never holds a password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))
