"""JSON-lines log formatting for web and worker processes.

Every record becomes one JSON object with ``ts``, ``level``, ``logger`` and
``event`` (the message), plus the well-known context fields when a caller
passes them through ``extra=`` (``job_id``, ``policy``, ``backend``, ``attempt``,
``trace_id``, ...). Secrets never reach a log call: backends are logged by name.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)
