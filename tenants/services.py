"""Audited writes to tenants, their members and their API keys, from the admin or the API.

Each change commits together with its audit entry (``audit.AuditEntry``), as the registry's do
(``routing.backends``). A key is never written to the log, only its name and prefix. Changes that
alter who a request acts for drop this process's remembered answers at once (``tenants.identity``
for memberships, ``tenants.keys`` for keys and tenants); other processes follow within
``AUTH_TOKEN_CACHE_S``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from audit import log
from audit.models import AuditEntry
from routing.models import Backend
from tenants import identity, keys
from tenants.models import ApiKey, Membership, Tenant

AUDITED_FIELDS = (
    "name",
    "description",
    "enabled",
    "rpm_limit",
    "tokens_per_day",
    "budget_usd",
    "budget_period",
    "max_priority",
    "allowed_backends",
    "weight",
    "max_queued",
    "queue_timeout_s",
)


class MemberOfAnotherTenant(Exception):
    """The user already belongs to another tenant (a user has at most one)."""

    def __init__(self, username: str, tenant: Tenant) -> None:
        self.username = username
        self.tenant = tenant
        super().__init__(
            f"{username} belongs to tenant {tenant.name!r}; a user belongs to at most one tenant "
            '(send "move": true to move them).'
        )


def unknown_backends(names: Iterable[str]) -> list[str]:
    """The names in ``names`` that no registered backend has, in their order."""
    wanted = list(dict.fromkeys(names))
    known = set(Backend.objects.filter(name__in=wanted).values_list("name", flat=True))
    return [n for n in wanted if n not in known]


def state(tenant: Tenant) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in AUDITED_FIELDS:
        value = getattr(tenant, name)
        if name == "budget_usd" and value is not None:
            value = f"{value:f}"
        out[name] = value
    return out


def save(tenant: Tenant, *, user=None, source: str) -> AuditEntry | None:
    """Create ``tenant`` or store the edits made to it, with an entry naming each changed field."""
    with transaction.atomic():
        if tenant.pk is None:
            before: dict[str, Any] = {}
            action = "create"
        else:
            before = state(Tenant.objects.select_for_update().get(pk=tenant.pk))
            action = "update"
        tenant.save()
        changes = log.diff(before, state(Tenant.objects.get(pk=tenant.pk)))
        transaction.on_commit(keys.forget)  # its keys' remembered tenant (enabled, limits) is stale
        if action == "update" and not changes:
            return None
        return log.record(tenant, action, user=user, source=source, changes=changes)


def delete(tenant: Tenant, *, user=None, source: str) -> AuditEntry:
    """Delete ``tenant`` with its memberships and keys; its jobs stay, without a tenant."""
    with transaction.atomic():
        members = list(tenant.memberships.values_list("user_id", flat=True))
        entry = log.record(tenant, "delete", user=user, source=source, changes=log.diff(state(tenant), {}))
        tenant.delete()
        transaction.on_commit(lambda: _forget_members(members))
        transaction.on_commit(keys.forget)
        return entry


def add_member(tenant: Tenant, member: Any, *, move: bool = False, user=None, source: str) -> tuple[Membership, bool]:
    """Make ``member`` (a user) one of ``tenant``'s; ``(membership, created)``, created False when
    they already were. A member of another tenant is moved only with ``move``, else
    :class:`MemberOfAnotherTenant`."""
    with transaction.atomic():
        current = Membership.objects.select_for_update().select_related("tenant").filter(user=member).first()
        if current is not None and current.tenant_id == tenant.pk:
            return current, False
        if current is not None and not move:
            raise MemberOfAnotherTenant(member.get_username(), current.tenant)
        if current is not None:
            was = current.tenant.name
            current.tenant = tenant
            current.created_at = timezone.now()
            current.save(update_fields=["tenant", "created_at"])
            membership = current
            changes = {"tenant": [was, tenant.name]}
            action = "move_member"
        else:
            try:
                with transaction.atomic():
                    membership = Membership.objects.create(user=member, tenant=tenant)
            except IntegrityError:  # added to some tenant by a concurrent request
                other = Membership.objects.select_related("tenant").get(user=member)
                raise MemberOfAnotherTenant(member.get_username(), other.tenant) from None
            changes = {"tenant": [None, tenant.name]}
            action = "add_member"
        log.record(membership, action, user=user, source=source, changes=changes, name=member.get_username())
        transaction.on_commit(lambda: identity.forget(member.pk))
        return membership, True


def remove_member(membership: Membership, *, user=None, source: str) -> AuditEntry:
    with transaction.atomic():
        member_id = membership.user_id
        name = membership.user.get_username()
        entry = log.record(
            membership,
            "remove_member",
            user=user,
            source=source,
            changes={"tenant": [membership.tenant.name, None]},
            name=name,
        )
        membership.delete()
        transaction.on_commit(lambda: identity.forget(member_id))
        return entry


def issue_key(tenant: Tenant, name: str, *, user=None, source: str) -> tuple[ApiKey, str]:
    """A new key for ``tenant``: the saved row and the raw key, which nothing else ever sees again."""
    with transaction.atomic():
        key, raw = ApiKey.issue(tenant, name, created_by=user if getattr(user, "is_authenticated", False) else None)
        log.record(
            key,
            "issue_key",
            user=user,
            source=source,
            changes={"tenant": [None, tenant.name], "prefix": [None, key.prefix]},
        )
    return key, raw


def revoke_key(key: ApiKey, *, user=None, source: str) -> bool:
    """Revoke ``key`` (it answers 401 from then on); False when it already was."""
    with transaction.atomic():
        now = timezone.now()
        if not ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=now):
            return False
        key.revoked_at = now
        log.record(key, "revoke_key", user=user, source=source, changes={"revoked_at": [None, now.isoformat()]})
        digest = key.key_hash
        transaction.on_commit(lambda: keys.forget(digest))
    return True


def _forget_members(user_ids: list[int]) -> None:
    for user_id in user_ids:
        identity.forget(user_id)
