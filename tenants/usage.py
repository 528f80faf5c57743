"""A tenant's usage against its limits: tokens today and spend this budget period.

Read from the admission counters (``tenants.admission``: what admission itself compares with the
limits, so tokens today include the reservations of its waiting and running jobs), else, when Redis
has no counter (no limit set, a new day, Redis lost it), summed from the tenant's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.utils import timezone
from redis.exceptions import RedisError

from orchestrator_site.redis import redis_client
from tenants import admission
from tenants.models import Tenant


@dataclass(frozen=True)
class Usage:
    tokens_today: int  # used by ended jobs + reserved by active ones, this UTC day
    tokens_limit: int | None
    spend: Decimal  # dollars, this budget period (UTC day or month)
    budget: Decimal | None
    period: str  # 'day' | 'month'

    @property
    def tokens_share(self) -> float | None:
        return self.tokens_today / self.tokens_limit if self.tokens_limit else None

    @property
    def spend_share(self) -> float | None:
        return float(self.spend / self.budget) if self.budget else None


def usage_of(tenant: Tenant) -> Usage:
    """One Redis round trip; a missing counter costs one aggregate query over the tenant's rows."""
    now = timezone.now()
    tokens_key = admission.tokens_key(tenant.pk, now)
    spend_key = admission.spend_key(tenant.pk, tenant.budget_period, now)
    try:
        raw_tokens, raw_spend = redis_client().mget([tokens_key, spend_key])
    except RedisError:
        raw_tokens = raw_spend = None
    tokens = int(raw_tokens) if raw_tokens is not None else admission.tokens_from_rows(tenant.pk, now)
    if raw_spend is not None:
        spend = Decimal(int(raw_spend)) / admission.MICRO
    else:
        spend = admission.spend_from_rows(tenant.pk, tenant.budget_period, now)
    return Usage(
        tokens_today=tokens,
        tokens_limit=tenant.tokens_per_day,
        spend=spend,
        budget=tenant.budget_usd,
        period=tenant.budget_period,
    )


def tokens_text(u: Usage) -> str:
    limit = f"{u.tokens_limit:,}" if u.tokens_limit is not None else "no limit"
    return f"{u.tokens_today:,} / {limit}"


def spend_text(u: Usage) -> str:
    budget = f"${u.budget:,.2f}" if u.budget is not None else "no budget"
    return f"${u.spend:,.2f} / {budget} (this {u.period})"
