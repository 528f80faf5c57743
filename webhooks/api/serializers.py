"""Bodies of ``/webhooks``: what a client sends to make an endpoint, and what it reads back.

The secret is in one answer only, the one to ``POST /webhooks`` (``NewWebhookEndpointSerializer``).
"""

from __future__ import annotations

from rest_framework import serializers

from orchestrator_site.serializer_fields import RefuseUnknownFields, StrictCharField
from webhooks import destination
from webhooks.models import EventType, WebhookEndpoint, events_problem

URL_MAX = 2000


class WebhookEndpointCreateSerializer(RefuseUnknownFields, serializers.Serializer):
    """The body of ``POST /webhooks``. Unknown fields are refused (400 naming them)."""

    url = StrictCharField(
        max_length=URL_MAX, help_text="http(s) URL on a public address (no credentials, no #fragment)."
    )
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=EventType.choices),
        allow_empty=False,
        max_length=len(EventType.values),
        help_text="The event types this endpoint receives.",
    )
    description = StrictCharField(max_length=200, required=False, allow_blank=True, default="")
    enabled = serializers.BooleanField(required=False, default=True)

    def validate_url(self, url: str) -> str:
        url = url.strip()
        if problem := destination.url_problem(url):
            raise serializers.ValidationError(problem)
        return url

    def validate_events(self, events: list[str]) -> list[str]:
        if problem := events_problem(events):
            raise serializers.ValidationError(problem)
        return list(dict.fromkeys(events))


class WebhookEndpointSerializer(serializers.ModelSerializer):
    """An endpoint as ``GET /webhooks`` shows it: never its secret."""

    tenant = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)
    events = serializers.ListField(child=serializers.ChoiceField(choices=EventType.choices), read_only=True)

    class Meta:
        model = WebhookEndpoint
        fields = ["id", "url", "events", "description", "enabled", "disabled_reason", "tenant", "created_at"]
        read_only_fields = fields


class NewWebhookEndpointSerializer(WebhookEndpointSerializer):
    """The endpoint just made, with its signing secret: shown in this answer only."""

    secret = serializers.CharField(
        read_only=True,
        help_text="The signing secret (whsec_<base64>): shown this once. Verify webhook-signature with it.",
    )

    class Meta(WebhookEndpointSerializer.Meta):
        fields = [*WebhookEndpointSerializer.Meta.fields, "secret"]
        read_only_fields = fields
