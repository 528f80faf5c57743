"""Reading and checking a batch input file, one line at a time (never the whole file in memory).

A line is ``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}``;
its body is checked by the same code as ``POST /v1/chat/completions`` (``openai_api.translate``),
and its model against the registry snapshot as that endpoint resolves it. Each problem is a
``LineError`` naming the line (1-based) in OpenAI's ``BatchError`` shape. No ORM, no Redis here:
the caller passes the snapshot and the tenant.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from openai_api import translate, validation
from routing.registry import Snapshot
from tenants import admission

ENDPOINT = "/v1/chat/completions"
LINE_KEYS = {"custom_id", "method", "url", "body"}
CUSTOM_ID_MAX = 512
# Set by the batch, not per line: a line may not choose another priority, stream or queue timeout.
BATCH_OWNED = ("priority", "stream", "stream_options", "queue_timeout_s")
READ_CHUNK = 64 * 1024


@dataclass
class LineError:
    """A refused line, as OpenAI's ``BatchError``."""

    line: int
    code: str
    message: str
    param: str | None = None
    custom_id: str = ""  # when the line got that far

    def as_openai(self) -> dict[str, Any]:
        return {"code": self.code, "line": self.line, "message": self.message, "param": self.param}


@dataclass
class Line:
    """A checked line: the job submission it becomes (``job``, as ``jobs.services`` takes it)."""

    number: int
    custom_id: str
    job: dict[str, Any]
    size: int  # bytes of the line in the file
    images: list[str] = field(default_factory=list)


def read_lines(stream: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, bytes)`` for each non-blank line; ``None`` for a line longer than ``max_bytes``,
    which is skipped without being held."""
    number = 0
    while True:
        raw = stream.readline(max_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while True:  # the rest of the long line, a chunk at a time
                rest = stream.readline(READ_CHUNK)
                if not rest or rest.endswith(b"\n"):
                    break
            yield number, None
            continue
        if raw.strip():
            yield number, raw


def check_line(
    number: int,
    raw: bytes | None,
    *,
    snap: Snapshot,
    tenant: Any,
    limits: dict[str, int],
    seen: set[str],
    max_bytes: int,
) -> Line | LineError:
    """Check one line; ``seen`` holds the custom_ids of the lines before (this one is added)."""
    if raw is None:
        return LineError(number, "line_too_long", f"The line is longer than {max_bytes} bytes.")
    try:
        item = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return LineError(number, "invalid_json_line", f"The line is not valid JSON: {exc}.")
    if not isinstance(item, dict):
        return LineError(number, "invalid_json_line", "The line must be a JSON object.")
    unknown = sorted(set(item) - LINE_KEYS)
    if unknown:
        return LineError(number, "invalid_request", f"Unknown field '{unknown[0]}'.", unknown[0])
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, "missing_required_parameter", "'custom_id' is required: a string.", "custom_id")
    if len(custom_id) > CUSTOM_ID_MAX or "\x00" in custom_id:
        return LineError(number, "invalid_request", f"'custom_id' is at most {CUSTOM_ID_MAX} characters.", "custom_id")
    if custom_id in seen:
        return LineError(
            number, "duplicate_custom_id", f"The custom_id '{custom_id}' is used by an earlier line.", "custom_id"
        )
    seen.add(custom_id)
    checked = _check_request(number, item, custom_id, snap=snap, tenant=tenant, limits=limits)
    if isinstance(checked, LineError):
        checked.custom_id = custom_id
    else:
        checked.size = len(raw)
    return checked


def _check_request(
    number: int, item: dict[str, Any], custom_id: str, *, snap: Snapshot, tenant: Any, limits: dict[str, int]
) -> Line | LineError:
    if item.get("method") != "POST":
        return LineError(number, "invalid_method", "'method' must be POST.", "method")
    if item.get("url") != ENDPOINT:
        return LineError(number, "invalid_url", f"'url' must be {ENDPOINT}, the batch's endpoint.", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return LineError(number, "invalid_request", "'body' must be a JSON object.", "body")
    owned = [name for name in BATCH_OWNED if body.get(name) is not None]
    if owned and not (owned == ["stream"] and body["stream"] is False):
        name = owned[0]
        return LineError(number, "invalid_request", f"'body.{name}' is set by the batch, not by a line.", name)
    try:
        chat, images = validation.checked(body, priority_header=None, limits=limits)
        job = chat.job
        job.pop("priority", None)
    except translate.InvalidRequest as exc:
        return LineError(number, exc.code or "invalid_request", exc.message, exc.param)
    problem = resolve_model(job, chat.model, snap, tenant)
    if problem is not None:
        code, message = problem
        return LineError(number, code, message, "model")
    return Line(number=number, custom_id=custom_id, job=job, size=0, images=images)


def resolve_model(job: dict[str, Any], model: str, snap: Snapshot, tenant: Any) -> tuple[str, str] | None:
    """As ``/v1/chat/completions``: a backend name pins it, a model name lets routing choose; the
    problem (code, message) when the model is unknown or not the tenant's to use."""
    if model == translate.AUTO:
        return None
    backend = snap.backends.get(model)
    if backend is not None and backend.enabled:
        job.pop("model", None)
        job["backend"] = model
        if tenant is not None and not tenant.allows_backend(model):
            return "model_not_allowed", f"Backend '{model}' is not among the tenant's allowed_backends."
        return None
    if not any(b.enabled and b.model == model for b in snap.backends.values()):
        return "model_not_found", f"The model '{model}' does not exist or you do not have access to it."
    try:
        admission.check_model(tenant, model, snap)
    except admission.TenantForbidden as exc:
        return "model_not_allowed", exc.message
    return None
