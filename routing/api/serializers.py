from __future__ import annotations

from typing import Any

from rest_framework import serializers

from orchestrator_site.serializer_fields import ModelCleanMixin, RefuseUnknownFields, StrictCharField
from routing.models import Backend, RoutingPolicy
from routing.strategies import strategy_choices


class BackendSerializer(RefuseUnknownFields, ModelCleanMixin, serializers.ModelSerializer):
    api_key = StrictCharField(
        write_only=True, required=False, allow_blank=True, max_length=500, style={"input_type": "password"}
    )
    has_api_key = serializers.BooleanField(read_only=True)

    class Meta:
        model = Backend
        fields = [
            "id",
            "name",
            "kind",
            "base_url",
            "model",
            "api_key",
            "has_api_key",
            "enabled",
            "drain",
            "supports_multimodal",
            "max_context_tokens",
            "max_concurrency",
            "weight",
            "cost_input_per_1k",
            "cost_output_per_1k",
            "timeout_s",
            "config",
            "pool",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]


class BackendSummarySerializer(serializers.ModelSerializer):
    """The registry as a client program needs it: what it may pin a job to and what each backend can do.

    No ``base_url``, ``config``, prices or operational settings: those are for holders of the
    ``routing.view_backend`` permission (:class:`BackendSerializer`).
    """

    class Meta:
        model = Backend
        fields = ["id", "name", "kind", "model", "supports_multimodal", "enabled"]
        read_only_fields = fields


class RoutingPolicySerializer(RefuseUnknownFields, ModelCleanMixin, serializers.ModelSerializer):
    strategy = serializers.ChoiceField(choices=[])

    class Meta:
        model = RoutingPolicy
        fields = ["id", "name", "strategy", "params", "description", "is_active", "version", "created_at", "updated_at"]
        read_only_fields = ["id", "is_active", "version", "created_at", "updated_at"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["strategy"].choices = strategy_choices()
