from __future__ import annotations

from typing import Any

from rest_framework import serializers

from orchestrator_site.serializer_fields import ModelCleanMixin, RefuseUnknownFields, StrictCharField
from tenants.models import ApiKey, Membership, Tenant
from tenants.services import AUDITED_FIELDS, unknown_backends

INT_MAX = 2**31 - 1
BIGINT_MAX = 2**63 - 1


class TenantSerializer(RefuseUnknownFields, ModelCleanMixin, serializers.ModelSerializer):
    allowed_backends = serializers.ListField(
        child=StrictCharField(max_length=100),
        required=False,
        max_length=500,
        help_text="Backend names its jobs may use; empty for all.",
    )

    class Meta:
        model = Tenant
        fields = ["id", *AUDITED_FIELDS, "created_at", "updated_at"]  # every editable field is audited
        read_only_fields = ["id", "created_at", "updated_at"]
        extra_kwargs = {
            "rpm_limit": {"max_value": INT_MAX},
            "tokens_per_day": {"max_value": BIGINT_MAX},
            "budget_usd": {"min_value": 0},
            "max_queued": {"max_value": INT_MAX},
            "queue_timeout_s": {"max_value": INT_MAX},
        }

    def validate_allowed_backends(self, names: list[str]) -> list[str]:
        names = list(dict.fromkeys(names))
        if unknown := unknown_backends(names):
            raise serializers.ValidationError(f"Unknown backends: {', '.join(unknown)}.")
        return names


class MemberSerializer(serializers.ModelSerializer):
    user_id = serializers.IntegerField(read_only=True)
    username = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = Membership
        fields = ["user_id", "username", "created_at"]
        read_only_fields = fields


class AddMemberSerializer(RefuseUnknownFields, serializers.Serializer):
    username = StrictCharField(max_length=150)
    move = serializers.BooleanField(
        default=False, help_text="Move the user from the tenant they belong to (else 409 when they belong to one)."
    )

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict) and "move" in data and not isinstance(data["move"], bool):
            raise serializers.ValidationError({"move": ["Must be true or false."]})
        return super().to_internal_value(data)


class ApiKeySerializer(serializers.ModelSerializer):
    """A key as listed: never the key itself (only its hash is stored)."""

    class Meta:
        model = ApiKey
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "revoked_at"]
        read_only_fields = fields


class NewApiKeySerializer(RefuseUnknownFields, serializers.ModelSerializer):
    """A key just issued: the only answer that carries ``key``."""

    name = StrictCharField(max_length=100)
    key = serializers.CharField(read_only=True, help_text="The key itself: shown this once, stored only hashed.")

    class Meta:
        model = ApiKey
        fields = ["id", "name", "key", "created_at"]
        read_only_fields = ["id", "key", "created_at"]
