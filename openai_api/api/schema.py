"""What the OpenAPI schema says of ``/v1``: OpenAI's shapes, documented so clients and the fuzz test
can hold the answers to them. Every ``/v1`` view names :class:`OpenAIError` as its ``error_serializer``,
so ``orchestrator_site.schema.AutoSchema`` documents each error answer it can give in OpenAI's shape."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

from openai_api import translate


class OpenAIErrorDetail(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField()
    param = serializers.CharField(allow_null=True)
    code = serializers.CharField(allow_null=True)


class OpenAIError(serializers.Serializer):
    """Every error answer under ``/v1`` (``openai_api.errors``): OpenAI's error object."""

    error = OpenAIErrorDetail()


class Model(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    created = serializers.IntegerField()
    owned_by = serializers.CharField()


class ModelList(serializers.Serializer):
    object = serializers.CharField()
    data = Model(many=True)


class ChatCompletionRequest(serializers.Serializer):
    """The body of ``POST /v1/chat/completions``, checked by ``openai_api.translate.parse`` (documentation only)."""


class ChatCompletionRequestSchema(OpenApiSerializerExtension):
    """OpenAI's fields that ``translate.parse`` knows; any other is a 400."""

    target_class = ChatCompletionRequest

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        return CHAT_REQUEST


CHAT_REQUEST = {
    "type": "object",
    "description": "OpenAI's Chat Completions request (docs/openai.md). An unknown field is a 400 naming it.",
    "required": ["model", "messages"],
    "properties": {
        **{name: {} for name in sorted(translate.KNOWN)},
        "model": {"type": "string", "description": "A model name, a backend name, or `auto`."},
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object"}},
        "stream": {"type": "boolean", "nullable": True},
    },
    "additionalProperties": False,
}

COMPLETION_RESPONSES = {
    (200, "application/json"): OpenApiResponse(OpenApiTypes.OBJECT, description="A chat.completion object."),
    (200, "text/event-stream"): OpenApiResponse(
        OpenApiTypes.STR, description="With stream: chat.completion.chunk events, then data: [DONE]."
    ),
    404: OpenApiResponse(description="No such model (code `model_not_found`), or the job no longer exists."),
    409: OpenApiResponse(description="The Idempotency-Key is in use by a request still in progress."),
    410: OpenApiResponse(description="The job was canceled before it ended (code `job_canceled`)."),
    422: OpenApiResponse(
        description="The job failed (code `job_failed`), the pinned backend cannot take it, or the key was used"
        " with another body."
    ),
    429: OpenApiResponse(description="Over a tenant's limit (`code` names it); retry after `Retry-After` seconds."),
}
