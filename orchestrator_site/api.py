"""API-wide error handling: every expected failure is a 4xx/503 with a message, never a 500."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.defaults import page_not_found
from redis.exceptions import RedisError
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from jobs.idempotency import IdempotencyError
from routing.services import RoutingError
from tenants.admission import AdmissionRefused, TenantForbidden

log = logging.getLogger(__name__)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, RoutingError):
        body: dict[str, Any] = {"detail": exc.message}
        if exc.field:
            body[exc.field] = [exc.message]
        if exc.rejected:
            body["rejected"] = exc.rejected
        headers = {"Retry-After": "5"} if exc.status == 503 else None
        return Response(body, status=exc.status, headers=headers)
    if isinstance(exc, AdmissionRefused):
        return Response(exc.body(), status=exc.status, headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, TenantForbidden):
        return Response(exc.body(), status=exc.status)
    if isinstance(exc, IdempotencyError):
        return Response({"detail": exc.message, "Idempotency-Key": [exc.message]}, status=exc.status)
    if isinstance(exc, RequestDataTooBig):
        return Response({"detail": "Request body is too large."}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, RedisError):
        log.error("redis unavailable", extra={"error": str(exc)})
        return Response(
            {"detail": "The queue (Redis) is unavailable; retry shortly."},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, (OperationalError, InterfaceError)):
        log.error("database unavailable", extra={"error": str(exc)})
        return Response(
            {"detail": "The database is unavailable; retry shortly."},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )
    return drf_exception_handler(exc, context)


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's 404 for a path no view matches (``handler404``): JSON, as the API's own 404s, except in
    the admin, whose visitors are people."""
    if request.path.startswith("/admin/"):
        return page_not_found(request, exception)
    return JsonResponse({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)


# --- the schema of those answers --------------------------------------------------
ERROR_SCHEMA = {
    "type": "object",
    "description": "An error: `detail` says what went wrong; a 400 names each bad field with its messages.",
    "properties": {"detail": {"type": "string"}},
    "additionalProperties": True,
}
_ERRORS = {
    "400": "The request is invalid: the body names each bad field.",
    "401": "No valid credentials.",
    "403": "Authenticated, but not allowed to do this.",
    "404": "No such object (or not yours).",
    "413": "The request body is too large.",
    "503": "A dependency (database, Redis) or every eligible backend is unavailable; retry after `Retry-After`.",
}


def document_errors(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular post-processing hook: every operation documents the error answers this module
    and DRF give (400 when it takes input, 401/403 when it needs a login, 404 on an object's path,
    413 for a body, 503 always), each with the error schema, beside what its view declared."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in result.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            codes = {"503"}
            if {} not in operation.get("security", [{}]):
                codes |= {"401", "403"}
            if "{" in path:
                codes.add("404")
            if "requestBody" in operation:
                codes |= {"400", "413"}
            if any(p.get("in") in ("query", "header") for p in operation.get("parameters", [])):
                codes.add("400")
            responses = operation["responses"]
            for code in sorted(codes):
                responses.setdefault(code, {"description": _ERRORS[code]})
            for code, response in responses.items():
                if code >= "400" and "content" not in response:
                    response["content"] = error
    return result
