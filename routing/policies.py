"""Audited writes to routing policies: create, edit, activate and delete, from the admin, the API or a shell.

Every write goes through here, so each one commits together with its audit entry
(``PolicyChange``) and tells every process to reload its routing snapshot, and the rule
"the active policy cannot be deleted" is checked in one place, under a row lock.
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F

from routing import registry
from routing.models import PolicyAction, PolicyChange, RoutingPolicy

AUDITED_FIELDS = ("name", "strategy", "params", "description", "is_active", "version")


class ActivePolicyError(Exception):
    """The active policy cannot be deleted: routing would have nothing to follow."""

    def __init__(self, policy: RoutingPolicy) -> None:
        super().__init__(f"The active policy {policy.name!r} cannot be deleted; activate another policy first.")


def policy_state(policy: RoutingPolicy) -> dict[str, Any]:
    """What an operator cares about in a policy, as JSON."""
    return {f: getattr(policy, f) for f in AUDITED_FIELDS}


def changed_fields(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, from, to) for every field that differs; ``version`` is noise here and left out."""
    keys = [k for k in AUDITED_FIELDS if k != "version"]
    return [(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)]


def save(policy: RoutingPolicy, *, user=None, source: str) -> PolicyChange:
    """Create ``policy`` (no primary key yet) or store the edits made to it; ``is_active`` is not
    changed here (see :func:`activate`)."""
    with transaction.atomic():
        if policy.pk is None:
            before: dict[str, Any] = {}
            action = PolicyAction.CREATE
        else:
            stored = RoutingPolicy.objects.select_for_update().get(pk=policy.pk)
            before = policy_state(stored)
            policy.is_active = stored.is_active  # activation has its own path, with its own entry
            action = PolicyAction.UPDATE
        policy.save()
        return _record(policy, action, user=user, source=source, before=before, after=policy_state(policy))


def activate(policy: RoutingPolicy, *, user=None, source: str = "shell") -> PolicyChange:
    """Make ``policy`` the only active one, atomically (the partial unique index backs it up).

    Two operators activating at once can collide on the index; the loser retries and wins last.
    The audit entry (from the previously active policy to this one) commits with the switch.
    """
    for attempt in range(3):
        try:
            with transaction.atomic():
                previous = RoutingPolicy.objects.filter(is_active=True).exclude(pk=policy.pk).first()
                RoutingPolicy.objects.filter(is_active=True).exclude(pk=policy.pk).update(is_active=False)
                RoutingPolicy.objects.filter(pk=policy.pk).update(is_active=True, version=F("version") + 1)
                policy.refresh_from_db()
                entry = _record(
                    policy,
                    PolicyAction.ACTIVATE,
                    user=user,
                    source=source,
                    before=policy_state(previous) if previous else {},
                    after=policy_state(policy),
                )
                # update() sends no post_save, so the reload is asked for here.
                registry.invalidate()
                return entry
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")  # the loop returns or raises


def delete(policy: RoutingPolicy, *, user=None, source: str) -> PolicyChange:
    """Delete an inactive policy; the audit entry outlives it. Raises :class:`ActivePolicyError`
    for the active one (read under a row lock, so a concurrent activation cannot slip in between)."""
    with transaction.atomic():
        stored = RoutingPolicy.objects.select_for_update().filter(pk=policy.pk).first()
        if stored is None:
            raise RoutingPolicy.DoesNotExist(f"No routing policy {policy.pk}.")
        if stored.is_active:
            raise ActivePolicyError(stored)
        entry = _record(stored, PolicyAction.DELETE, user=user, source=source, before=policy_state(stored), after={})
        stored.delete()
        return entry


def _record(
    policy: RoutingPolicy, action: str, *, user, source: str, before: dict[str, Any], after: dict[str, Any]
) -> PolicyChange:
    user = user if user is not None and getattr(user, "is_authenticated", False) else None
    return PolicyChange.objects.create(
        policy=policy if policy.pk is not None else None,
        policy_name=policy.name,
        action=action,
        user=user,
        username=user.get_username() if user else "",
        source=source,
        version=after.get("version") if after else before.get("version"),
        before=before,
        after=after,
    )
