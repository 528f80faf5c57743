"""Writing the audit log: one entry per change, in the transaction that makes it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from django.db import models

from audit.models import AuditEntry

# What a secret's change is recorded as: whether it was set, never its value.
SECRET_CHANGED = "changed"


def diff(before: Mapping[str, Any], after: Mapping[str, Any], *, secrets: Iterable[str] = ()) -> dict[str, list[Any]]:
    """``{field: [from, to]}`` for every field whose value differs; secrets as ``[from, "changed"]``
    where ``from`` says only whether one was set."""
    hidden = set(secrets)
    out: dict[str, list[Any]] = {}
    for field in dict.fromkeys([*before, *after]):
        old, new = before.get(field), after.get(field)
        if old == new:
            continue
        if field in hidden:
            out[field] = ["set" if old else "not set", SECRET_CHANGED if new else "cleared"]
        else:
            out[field] = [old, new]
    return out


def record(
    target: models.Model,
    action: str,
    *,
    user=None,
    source: str,
    changes: Mapping[str, list[Any]] | None = None,
    detail: str = "",
    name: str | None = None,
) -> AuditEntry:
    """Write one entry; call it inside the transaction that makes the change, so both commit or neither.

    ``name`` replaces ``str(target)`` as the name the entry is found by.
    """
    user = user if user is not None and getattr(user, "is_authenticated", False) else None
    return AuditEntry.objects.create(
        user=user,
        username=user.get_username() if user else "",
        source=source,
        action=action,
        target_type=target._meta.label_lower,
        target_id=str(target.pk),
        target_name=(str(target) if name is None else name)[:200],
        changes=dict(changes or {}),
        detail=detail[:500],
    )
