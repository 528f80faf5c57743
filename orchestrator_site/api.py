"""API-wide error handling: every expected failure is a 4xx/503 with a message, never a 500."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from redis.exceptions import RedisError
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from jobs.idempotency import IdempotencyError
from routing.services import RoutingError

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
