"""What the OpenAPI schema says of ``/v1``: OpenAI's shapes, documented so clients and the fuzz test
can hold the answers to them (``orchestrator_site.api.document_errors`` keeps what is declared here)."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers


class OpenAIErrorDetail(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField()
    param = serializers.CharField(allow_null=True)
    code = serializers.CharField(allow_null=True)


class OpenAIError(serializers.Serializer):
    error = OpenAIErrorDetail()


class Model(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    created = serializers.IntegerField()
    owned_by = serializers.CharField()


class ModelList(serializers.Serializer):
    object = serializers.CharField()
    data = Model(many=True)


def errors(*codes: int) -> dict[int, OpenApiResponse]:
    return {code: OpenApiResponse(OpenAIError, description="OpenAI's error object.") for code in codes}


COMPLETION_RESPONSES = {
    (200, "application/json"): OpenApiResponse(OpenApiTypes.OBJECT, description="A chat.completion object."),
    (200, "text/event-stream"): OpenApiResponse(
        OpenApiTypes.STR, description="With stream: chat.completion.chunk events, then data: [DONE]."
    ),
    **{
        (code, "application/json"): OpenApiResponse(OpenAIError, description="OpenAI's error object.")
        for code in (400, 401, 403, 404, 409, 410, 413, 415, 422, 429, 503)
    },
}
