"""Request validation, and the status document as the API describes it (``Job.status_document`` builds it)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from jobs.images import image_kind
from jobs.models import Job, Priority
from orchestrator_site.serializer_fields import RefuseUnknownFields, StrictCharField
from workers.backends import params as token_params

ROLES = ("system", "user", "assistant", "tool")


def _limits() -> dict[str, int]:
    return settings.JOB_LIMITS


@extend_schema_field(
    {"type": "string", "description": "A PNG, JPEG, GIF, WebP, BMP or TIFF image in base64, or a data: URL of one."}
)
class Base64ImageField(serializers.Field):
    """A base64 image (optionally a ``data:image/...;base64,`` URL); stored as plain base64."""

    default_error_messages = {
        "type": "Must be a base64 string.",
        "base64": "Not valid base64.",
        "size": "Image is {size} bytes; the limit is {limit} bytes.",
        "format": "Not a PNG, JPEG, GIF, WebP, BMP or TIFF image.",
    }

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("type")
        text = data.strip()
        if text.startswith("data:"):
            _, _, text = text.partition(",")
        limit = _limits()["image_bytes"]
        if len(text) > (limit * 4) // 3 + 8:
            self.fail("size", size=len(text) * 3 // 4, limit=limit)
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.fail("base64")
        if len(raw) > limit:
            self.fail("size", size=len(raw), limit=limit)
        if image_kind(raw) is None:
            self.fail("format")
        return text

    def to_representation(self, value: str) -> str:
        return value


class JsonObjectField(serializers.DictField):
    """A JSON object with a size limit, so metadata cannot be used to smuggle megabytes."""

    def to_internal_value(self, data: Any) -> dict:
        value = super().to_internal_value(data)
        size = len(json.dumps(value, default=str))
        limit = _limits()["json_field_bytes"]
        if size > limit:
            raise serializers.ValidationError(f"Is {size} bytes as JSON; the limit is {limit}.")
        return value


class MessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=ROLES)
    content = StrictCharField(allow_blank=True, trim_whitespace=False)

    def to_internal_value(self, data: Any) -> dict:
        if isinstance(data, dict):
            extra = set(data) - set(self.fields)
            if extra:
                raise serializers.ValidationError({name: ["Unknown message field."] for name in sorted(extra)})
        return super().to_internal_value(data)


class JobCreateSerializer(RefuseUnknownFields, serializers.Serializer):
    """The body of ``POST /jobs``. Unknown fields are rejected so typos do not pass silently."""

    messages = MessageSerializer(many=True, required=False, allow_empty=False)
    priority = serializers.ChoiceField(choices=Priority.choices, default=Priority.NORMAL)
    requires_multimodal = serializers.BooleanField(default=False)
    # Publish the output as it is generated (GET /jobs/<id>/stream); off, the output comes whole at the end.
    stream = serializers.BooleanField(default=False)
    model = serializers.CharField(required=False, allow_blank=True, max_length=200)
    backend = serializers.SlugField(required=False, allow_blank=True, max_length=64)
    temperature = serializers.FloatField(required=False, min_value=0.0, max_value=2.0)
    params = JsonObjectField(required=False)
    metadata = JsonObjectField(required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Limits are settings, read when the serializer is built (so tests can override them).
        limits = _limits()
        self.fields["prompt"] = StrictCharField(
            required=False, trim_whitespace=False, max_length=limits["prompt_chars"]
        )
        self.fields["images"] = serializers.ListField(
            child=Base64ImageField(), required=False, max_length=limits["images"]
        )
        self.fields["max_tokens"] = serializers.IntegerField(
            required=False, min_value=1, max_value=limits["max_tokens"]
        )
        self.fields["timeout_s"] = serializers.IntegerField(required=False, min_value=1, max_value=limits["timeout_s"])
        self.fields["queue_timeout_s"] = serializers.IntegerField(
            required=False, min_value=1, max_value=settings.MAX_QUEUE_TIMEOUT_S
        )

    def to_internal_value(self, data: Any) -> dict:
        if not isinstance(data, dict):
            raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
        return super().to_internal_value(data)

    def validate_messages(self, messages: list[dict]) -> list[dict]:
        limits = _limits()
        if len(messages) > limits["messages"]:
            raise serializers.ValidationError(f"At most {limits['messages']} messages are allowed.")
        total = sum(len(m["content"]) for m in messages)
        if total > limits["prompt_chars"]:
            raise serializers.ValidationError(
                f"Messages hold {total} characters; the limit is {limits['prompt_chars']}."
            )
        return [dict(m) for m in messages]

    def validate_params(self, params: dict) -> dict:
        """No token count above the output or context cap, under any backend kind's parameter name."""
        problems = token_params.problems(params, *token_params.caps())
        if problems:
            raise serializers.ValidationError([f"{path}: {message}" for path, message in problems.items()])
        return params

    def validate(self, attrs: dict) -> dict:
        has_prompt = bool(attrs.get("prompt"))
        has_messages = bool(attrs.get("messages"))
        if has_prompt == has_messages:
            which = "both" if has_prompt else "neither"
            raise serializers.ValidationError(
                {"prompt": [f"Give exactly one of 'prompt' or 'messages' (got {which})."]}
            )
        return attrs


_submission_validator: tuple[tuple, JobCreateSerializer] | None = None


def validate_submission(data: Any) -> dict:
    """``JobCreateSerializer(data=data)``'s validated data, from one serializer per process.

    Building the serializer (DRF deep-copies every declared field, then four more are
    made) cost more than validating a body; ``run_validation`` keeps no per-call state, so
    one instance per set of limits is reused. Invalid bodies take the ordinary path, so
    their error document is exactly ``is_valid(raise_exception=True)``'s.
    """
    global _submission_validator
    limits = (*sorted(_limits().items()), settings.MAX_QUEUE_TIMEOUT_S)
    cached = _submission_validator
    if cached is None or cached[0] != limits:
        validator = JobCreateSerializer()
        validator.fields  # noqa: B018 (build and bind the fields now, once)
        cached = _submission_validator = (limits, validator)
    try:
        return cached[1].run_validation(data)
    except serializers.ValidationError:
        serializer = JobCreateSerializer(data=data)
        serializer.is_valid(raise_exception=True)
        raise


class JobSerializer(serializers.ModelSerializer):
    """The status document: what ``GET /jobs/<id>`` answers and what Redis mirrors."""

    # These fields describe the document for the schema; ``Job.status_document`` builds it, for the mirror too.

    backend = serializers.CharField(source="backend_name")
    policy = serializers.CharField(source="policy_name")
    attempts = serializers.IntegerField(source="attempt_count")
    usage = serializers.DictField(child=serializers.IntegerField(allow_null=True), read_only=True)
    cost = serializers.FloatField(allow_null=True, read_only=True)
    attempt_log = serializers.ListField(child=serializers.DictField(), read_only=True)
    links = serializers.DictField(child=serializers.CharField(), read_only=True)
    owner_id = serializers.IntegerField(source="created_by_id")
    tenant = serializers.CharField(
        source="tenant_name", allow_null=True, help_text="The tenant the job was submitted for (its name then)."
    )
    queue_timeout_s = serializers.IntegerField(
        allow_null=True, help_text="Not started within this many seconds, the job ends 'expired'."
    )
    expires_at = serializers.DateTimeField(allow_null=True, help_text="When a waiting job expires (null: never).")
    tenant_id = serializers.IntegerField(allow_null=True)

    class Meta:
        model = Job
        fields = [
            "id",
            "state",
            "priority",
            "backend",
            "policy",
            "policy_version",
            "model",
            "queue",
            "attempts",
            "created_at",
            "enqueued_at",
            "started_at",
            "finished_at",
            "error",
            "usage",
            "cost",
            "latency_ms",
            "finish_reason",
            "output",
            "tool_calls",
            "metadata",
            "attempt_log",
            "links",
            "tenant",
            "queue_timeout_s",
            "expires_at",
            "owner_id",
            "tenant_id",
        ]
        read_only_fields = fields

    def to_representation(self, instance: Job) -> dict[str, Any]:
        return instance.status_document()


# Fields of the status document that are internal (access control) or belong to /result.
PRIVATE_FIELDS = ("owner_id", "tenant_id")
RESULT_FIELDS = (
    "id",
    "state",
    "backend",
    "output",
    "tool_calls",
    "finish_reason",
    "usage",
    "cost",
    "latency_ms",
    "error",
)


def public(doc: dict[str, Any], *, with_output: bool = False) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in PRIVATE_FIELDS and (with_output or k != "output")}
