"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, OpenAI's statuses.

The project's one error mapper (``orchestrator_site.api.exception_handler``) decides the status and
the message; this only reshapes its answer, so ``/v1`` and ``/jobs`` refuse the same things alike.
"""

from __future__ import annotations

from typing import Any

from rest_framework.response import Response

from openai_api.translate import InvalidRequest
from orchestrator_site.api import exception_handler as api_exception_handler

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    410: "job_canceled",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "unprocessable_entity_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, InvalidRequest):
        return Response(body(400, exc.message, param=exc.param, code=exc.code), status=400)
    response = api_exception_handler(exc, context)
    if response is None:
        return None
    message, param = _message(response.data)
    code = getattr(getattr(exc, "detail", None), "code", None) or getattr(exc, "default_code", None)
    if isinstance(response.data, dict) and response.data.get("limit"):
        code = response.data["limit"]  # admission: which limit refused it
    response.data = body(response.status_code, message, param=param, code=code if isinstance(code, str) else None)
    return response


def _message(data: Any) -> tuple[str, str | None]:
    """The first human sentence in a DRF error body, and the field it names."""
    if isinstance(data, dict):
        if isinstance(data.get("detail"), str):
            return data["detail"], None
        for name, value in data.items():
            text, _ = _message(value)
            return (f"{name}: {text}" if name != "non_field_errors" else text), name
    if isinstance(data, list) and data:
        return _message(data[0])
    return str(data), None
