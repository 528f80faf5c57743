"""One exception hierarchy for everything the client can fail with.

Every non-2xx answer becomes an :class:`ApiError` subclass chosen by its status, whatever shape the body
has: the jobs API's ``{"detail": ..., "limit": ...}`` and per-field ``{"field": ["message"]}``, or the
``/v1`` endpoints' OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

_DEFAULT_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "too_large",
    422: "unprocessable",
    429: "rate_limited",
    501: "not_implemented",
    503: "unavailable",
}


class LlmoError(Exception):
    """Base class of every error this package raises."""


class TransportError(LlmoError):
    """The server could not be reached, or the connection broke, and retrying did not help."""


class WaitTimeout(LlmoError, TimeoutError):
    """A job or batch did not end within the time given to ``wait``; ``state`` is the last one seen."""

    def __init__(self, kind: str, object_id: str, state: str | None, waited_s: float) -> None:
        self.kind, self.id, self.state, self.waited_s = kind, object_id, state, waited_s
        super().__init__(f"{kind} {object_id} is still {state or 'unknown'} after {waited_s:.1f} s")


class ApiError(LlmoError):
    """The API answered an error: ``status``, a short ``code``, a readable ``message``, the parsed ``body``.

    ``code`` is the most specific name the body gives (a tenant limit such as ``rpm_limit``, an OpenAI
    error code), else one per status (``not_found``, ``rate_limited``, ...). ``fields`` holds the
    per-field messages of a validation error. ``retry_after`` (seconds) is set when the server said when
    to come back (``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        body: Any = None,
        fields: Mapping[str, list[str]] | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code or _DEFAULT_CODES.get(status, f"http_{status}")
        self.message = message
        self.body = body
        self.fields = dict(fields or {})
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        super().__init__(f"{status} {self.code}: {message}")


class BadRequest(ApiError):
    """400: invalid input; ``fields`` names each bad field."""


class Unauthorized(ApiError):
    """401: no credentials, or they are not valid."""


class Forbidden(ApiError):
    """403: not allowed (a tenant rule: ``code`` is the rule, e.g. ``max_priority``)."""


class NotFound(ApiError):
    """404: no such job, batch or file, or not yours."""


class Conflict(ApiError):
    """409: e.g. cancelling a job that has already ended, or an Idempotency-Key still in flight."""


class PayloadTooLarge(ApiError):
    """413: the request body is over the server's limit."""


class Unprocessable(ApiError):
    """422: a pinned backend that cannot take the job, or an Idempotency-Key reused with another body."""


class RateLimited(ApiError):
    """429: over a tenant limit or the queue's depth; ``retry_after`` says when it would pass."""


class ServerError(ApiError):
    """5xx other than 503."""


class ServiceUnavailable(ServerError):
    """503: a dependency or every eligible backend is unavailable; retry after ``retry_after``."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: Unprocessable,
    429: RateLimited,
    503: ServiceUnavailable,
}


def retry_after_seconds(headers: Mapping[str, str], body: Any = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date), else the body's ``retry_after``."""
    raw = headers.get("retry-after") or headers.get("Retry-After")
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            try:
                return max(0.0, (parsedate_to_datetime(raw) - datetime.now(UTC)).total_seconds())
            except (TypeError, ValueError):
                pass
    if isinstance(body, dict) and isinstance(body.get("retry_after"), int | float):
        return max(0.0, float(body["retry_after"]))
    return None


def _messages(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) if not isinstance(v, dict | list) else json.dumps(v) for v in value]
    if isinstance(value, dict):
        return [json.dumps(value)]
    return [str(value)]


def error_from_response(status: int, headers: Mapping[str, str], content: bytes, reason: str = "") -> ApiError:
    """The :class:`ApiError` for one HTTP answer (never raises on an odd body)."""
    try:
        body: Any = json.loads(content) if content else None
    except ValueError:
        body = content.decode("utf-8", "replace")[:1000]
    code: str | None = None
    fields: dict[str, list[str]] = {}
    message = ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):  # OpenAI's shape
        err = body["error"]
        message = str(err.get("message") or "")
        code = err.get("code") or err.get("type")
        if err.get("param"):
            fields[str(err["param"])] = [message]
    elif isinstance(body, dict):
        for name, value in body.items():
            # DRF names each bad field with a list (or, nested, an object) of messages; the rest are
            # facts about the refusal (``limit``, ``retry_after``, a 409's ``state``, a 503's ``rejected``).
            if isinstance(value, list | dict) and name not in ("detail", "rejected"):
                fields[name] = _messages(value)
        detail = body.get("detail")
        message = " ".join(_messages(detail)) if detail is not None else ""
        if not message and fields:
            message = "; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in fields.items())
        raw_code = body.get("limit") or body.get("code")
        code = str(raw_code) if raw_code else None
    elif isinstance(body, list):
        message = " ".join(_messages(body))
    elif isinstance(body, str):
        message = body.strip()
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return cls(
        status,
        message or reason or f"HTTP {status}",
        code=code,
        body=body,
        fields=fields,
        retry_after=retry_after_seconds(headers, body),
        headers=headers,
    )
