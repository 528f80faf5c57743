"""The audit log in the admin: read-only, newest first, filtered by what, where from and who."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from audit.models import AuditEntry


class ReadOnlyLogAdmin(admin.ModelAdmin):
    """An audit log in the admin: nobody adds, changes or deletes an entry, superusers included."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


def show(value: Any) -> str:
    """One value of a diff as the admin shows it."""
    if value is None:
        return "—"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def changes_html(rows: list[tuple[str, Any, Any]]) -> str:
    """A (field, from, to) diff as a small table."""
    cells = [(field, show(old), show(new)) for field, old, new in rows]
    return format_html(
        "<table><tr><th>field</th><th>from</th><th>to</th></tr>{}</table>",
        format_html_join("", "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>", cells),
    )


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyLogAdmin):
    list_display = ["at", "action", "target_type", "target_name", "username", "source", "summary"]
    list_filter = ["target_type", "action", "source"]
    search_fields = ["target_name", "=target_id", "username"]
    date_hierarchy = "at"
    show_full_result_count = False
    readonly_fields = [
        "at",
        "action",
        "target_type",
        "target_id",
        "target_name",
        "username",
        "source",
        "detail",
        "changes_table",
    ]
    fields = readonly_fields

    @admin.display(description="what changed")
    def summary(self, obj: AuditEntry) -> str:
        parts = [f"{field}: {show(old)} → {show(new)}" for field, (old, new) in _pairs(obj.changes)]
        if obj.detail:
            parts.append(obj.detail)
        return "; ".join(parts)[:200] or "—"

    @admin.display(description="from → to")
    def changes_table(self, obj: AuditEntry) -> str:
        return changes_html([(field, old, new) for field, (old, new) in _pairs(obj.changes)])


def _pairs(changes: Any) -> list[tuple[str, tuple[Any, Any]]]:
    """(field, (from, to)) pairs; tolerates rows not written by audit.log (hand-made or older shapes)."""
    if not isinstance(changes, dict):
        return []
    out = []
    for field, value in changes.items():
        if isinstance(value, list | tuple) and len(value) == 2:
            out.append((str(field), (value[0], value[1])))
    return out
