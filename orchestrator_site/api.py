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
