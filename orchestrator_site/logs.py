"""JSON-lines log formatting for web and worker processes.

Every record becomes one JSON object with ``ts``, ``level``, ``logger`` and
``event`` (the message), plus the well-known context fields when a caller
passes them through ``extra=`` (``job_id``, ``policy``, ``backend``, ``attempt``, ...).
``trace_id`` and ``span_id`` come from the active OpenTelemetry span when tracing is on,
so a log line leads to its trace (and a trace to its logs).

Secrets never reach a log call: backends are logged by name. As a second line of defence,
an ``extra`` field whose name says it holds a secret (``api_key``, ``authorization``,
``password``, ``secret``, ...) is written as ``"[redacted]"``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from orchestrator_site import tracing

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
# Not "token": the routing registry logs its (non-secret) cache version token under that name.
_SECRET_NAMES = frozenset({"authorization", "password", "secret", "access_token", "bearer", "cookie"})
_SECRET_SUFFIXES = ("api_key", "apikey", "_password", "_secret")
REDACTED = "[redacted]"


def _is_secret(name: str) -> bool:
    """By name only (``prompt_tokens`` is not a secret, ``token`` and ``openai_api_key`` are)."""
    lowered = name.lower()
    return lowered in _SECRET_NAMES or lowered.endswith(_SECRET_SUFFIXES)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; never raises on an odd ``extra`` value (``str()`` is the fallback)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = REDACTED if _is_secret(key) and value else value
        if "trace_id" not in doc:
            ids = tracing.current_ids()
            if ids is not None:
                doc["trace_id"], doc["span_id"] = ids
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)
