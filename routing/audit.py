"""The policy audit log: every create, edit, activation and deletion, from the admin, the API or a shell."""

from __future__ import annotations

from typing import Any

from routing.models import PolicyChange, RoutingPolicy

AUDITED_FIELDS = ("name", "strategy", "params", "description", "is_active", "version")


def policy_state(policy: RoutingPolicy) -> dict[str, Any]:
    """What an operator cares about in a policy, as JSON."""
    return {f: getattr(policy, f) for f in AUDITED_FIELDS}


def record(
    policy: RoutingPolicy,
    action: str,
    *,
    user=None,
    source: str,
    before: dict[str, Any],
    after: dict[str, Any],
) -> PolicyChange:
    """Write one audit entry; call it inside the transaction that makes the change."""
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


def changed_fields(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, from, to) for every field that differs; ``version`` is noise here and left out."""
    keys = [k for k in AUDITED_FIELDS if k != "version"]
    return [(k, before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)]
