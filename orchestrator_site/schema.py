"""What the OpenAPI schema says of every operation's failures, so that it documents every answer.

The error answers come from one place (``orchestrator_site.api.exception_handler``) and DRF's own
request handling, so which of them an operation can give follows from its view, not from each
view's declarations: :class:`AutoSchema` (``DEFAULT_SCHEMA_CLASS``) adds them to every operation,
each with the view's error body (:class:`ErrorSerializer`, or the ``error_serializer`` a view names,
as ``/v1`` names OpenAI's). A view declares only what is its own (``@extend_schema``: 202, 409,
422, 429...); a declared error without a body gets the view's error body.

Request bodies that refuse unknown fields (:class:`~orchestrator_site.serializer_fields.RefuseUnknownFields`)
are documented closed (``additionalProperties: false``).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular import openapi
from drf_spectacular.extensions import OpenApiSerializerExtension
from rest_framework import serializers

# Why each generic error answer happens (the description in the schema).
GENERIC_ERRORS = {
    400: "The request is invalid (a body, query or header value): the body names each bad field.",
    401: "No valid credentials (none, an unknown or revoked token or key).",
    403: "Authenticated, but not allowed (a missing permission, a disabled tenant's key, a CSRF failure).",
    404: "No such object, or not yours.",
    406: "The Accept header names no type this operation answers.",
    413: "The request body is larger than MAX_REQUEST_BYTES.",
    415: "The request body's Content-Type is not one this operation reads.",
    503: "The database or Redis is unavailable (or, for a job, every eligible backend): retry after Retry-After.",
}

# The error mapper sends it with every 429 and 503: when to try again.
RETRY_AFTER = {"schema": {"type": "integer"}, "description": "Seconds to wait before trying again."}


class ErrorSerializer(serializers.Serializer):
    """Every error answer of the API outside `/v1` (`orchestrator_site.api.exception_handler`).

    `detail` says what went wrong; a 400 names each bad field with its messages (for a nested field,
    the nested errors) and may have no `detail`. The other keys appear where the status says.
    """

    detail = serializers.CharField(required=False, help_text="What went wrong.")
    limit = serializers.CharField(
        required=False,
        help_text="403/429 from a tenant's rule: the rule (enabled, max_priority, allowed_backends, rpm_limit, "
        "tokens_per_day, budget_usd, max_queued, queue_max_depth).",
    )
    retry_after = serializers.IntegerField(required=False, help_text="429: seconds until it would pass.")
    rejected = serializers.DictField(
        child=serializers.CharField(), required=False, help_text="503 no eligible backend: why, per backend."
    )
    state = serializers.CharField(required=False)  # documented in ErrorSchema: it may also be a field's messages


class ErrorSchema(OpenApiSerializerExtension):
    """The error body is open: a 400 names each bad field beside the keys above."""

    target_class = ErrorSerializer

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        schema["properties"]["state"] = {
            "description": "409 of a cancel: the state the job is already in; 400 of a list: the `state` filter's "
            "messages.",
            "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
        }
        schema["additionalProperties"] = {
            "description": "A bad field (or header): its messages, or for a nested field its nested errors.",
            "oneOf": [{"type": "array", "items": {}}, {"type": "object"}],
        }
        return schema


class ClosedBodySchema(OpenApiSerializerExtension):
    """A serializer that refuses unknown fields is documented so: ``additionalProperties: false``."""

    target_class = "orchestrator_site.serializer_fields.RefuseUnknownFields"
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        schema["additionalProperties"] = False
        return schema


def error_codes(view: Any, path: str, operation: dict[str, Any]) -> set[int]:
    """The error statuses an operation can answer whatever its view does, from how DRF serves it."""
    codes = {406, 503}  # content negotiation runs first; any view reads the database or Redis
    if getattr(view, "authentication_classes", None):
        codes |= {401, 403}  # a bad token is refused even where anyone may call; a disabled tenant's key too
    if "{" in path:
        codes.add(404)
    if any(p.get("in") in ("query", "header") for p in operation.get("parameters", [])):
        codes.add(400)
    if "requestBody" in operation:
        codes |= {400, 413, 415}
    return codes


class AutoSchema(openapi.AutoSchema):
    """drf-spectacular's schema of a view, with every error answer it can give documented."""

    def get_operation(self, path: str, path_regex: str, path_prefix: str, method: str, registry: Any) -> Any:
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        error = getattr(self.view, "error_serializer", ErrorSerializer)
        content = {"application/json": {"schema": self.resolve_serializer(error, "response").ref}}
        responses = operation["responses"]
        for code in sorted(error_codes(self.view, path, operation)):
            responses.setdefault(str(code), {"description": GENERIC_ERRORS[code]})
        for code, response in responses.items():
            if code >= "400" and "content" not in response:
                response["content"] = content
            if code in ("429", "503"):
                response.setdefault("headers", {}).setdefault("Retry-After", RETRY_AFTER)
        return operation
