"""``UsageMixin``: a tenant's tokens today and spend this period, vs its limits, in the Tenant admin.

Mix it into the Tenant ``ModelAdmin`` (before ``admin.ModelAdmin``): the change page shows both as
read-only fields (with ``fieldsets``, name ``USAGE_FIELDS`` in one) and the list as columns. Each row
reads its counters (``tenants.usage``): one Redis round trip, and an aggregate query only where Redis
has no counter.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from tenants import usage
from tenants.models import Tenant

USAGE_FIELDS = ("tokens_today", "spend_this_period")


class UsageMixin:
    """Adds ``tokens_today`` and ``spend_this_period`` to the read-only fields and the list columns."""

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        fields = tuple(super().get_readonly_fields(request, obj))  # type: ignore[misc]
        if obj is None:  # a tenant being created has no usage
            return fields
        return fields + tuple(f for f in USAGE_FIELDS if f not in fields)

    def get_list_display(self, request: HttpRequest) -> tuple[str, ...]:
        columns = tuple(super().get_list_display(request))  # type: ignore[misc]
        return columns + tuple(f for f in USAGE_FIELDS if f not in columns)

    @admin.display(description="Tokens today (used + reserved) / limit")
    def tokens_today(self, obj: Tenant) -> str:
        return usage.tokens_text(usage.usage_of(obj))

    @admin.display(description="Spend this period / budget")
    def spend_this_period(self, obj: Tenant) -> str:
        return usage.spend_text(usage.usage_of(obj))
