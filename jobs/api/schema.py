"""What the OpenAPI schema says of ``/jobs`` where a serializer alone would make it lie.

The status document loses its private fields on the way out, ``/result`` answers a subset
(or, until the job ends, a pending stub), and the submission body rejects unknown fields and
needs exactly one of ``prompt`` and ``messages``. Documentation only: nothing here validates.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiSerializerExtension
from rest_framework import serializers

from jobs.api.serializers import PRIVATE_FIELDS, RESULT_FIELDS, JobSerializer


class JobStatusSerializer(JobSerializer):
    """A job's status document as the API answers it (``GET /jobs/<id>``, list entries, submit)."""

    class Meta(JobSerializer.Meta):
        fields = [f for f in JobSerializer.Meta.fields if f not in (*PRIVATE_FIELDS, "output")]
        read_only_fields = fields


class JobDetailSerializer(JobStatusSerializer):
    """``GET /jobs/<id>``: the status document, and a waiting job's place (``jobs.queue_position``)."""

    queue_position = serializers.IntegerField(
        allow_null=True,
        read_only=True,
        help_text="While queued: 1 = the next job the workers would take (approximate; see docs/api.md).",
    )
    eta_s = serializers.FloatField(
        allow_null=True,
        read_only=True,
        help_text="While queued: seconds until it starts (measured drain rate).",
    )

    class Meta(JobStatusSerializer.Meta):
        fields = [*JobStatusSerializer.Meta.fields, "queue_position", "eta_s"]
        read_only_fields = fields


class JobResultSerializer(JobSerializer):
    """``GET /jobs/<id>/result`` once the job has ended."""

    class Meta(JobSerializer.Meta):
        fields = list(RESULT_FIELDS)
        read_only_fields = fields


class JobPendingSerializer(JobSerializer):
    """``GET /jobs/<id>/result`` while the job is still queued or running (202, ``Retry-After``)."""

    class Meta(JobSerializer.Meta):
        fields = ["id", "state", "links"]
        read_only_fields = fields


class JobCreateSchema(OpenApiSerializerExtension):
    """The submission body: closed (unknown fields are a 400) and exactly one of prompt and messages."""

    target_class = "jobs.api.serializers.JobCreateSerializer"
    priority = 1  # before orchestrator_site.schema.ClosedBodySchema, which only closes it

    def map_serializer(self, auto_schema, direction) -> dict[str, Any]:
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        schema["additionalProperties"] = False
        schema["properties"]["messages"]["minItems"] = 1
        schema["oneOf"] = [
            {"required": ["prompt"], "properties": {"prompt": {"minLength": 1}}},
            {"required": ["messages"], "properties": {"messages": {"minItems": 1}}},
        ]
        return schema


class MessageSchema(OpenApiSerializerExtension):
    """A chat message is closed too: any other key is a 400."""

    target_class = "jobs.api.serializers.MessageSerializer"

    def map_serializer(self, auto_schema, direction) -> dict[str, Any]:
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        schema["additionalProperties"] = False
        return schema
