"""What the sync and async clients share: settings, request bodies, the retry rules, the SSE decoder.

Nothing here does I/O, so :mod:`llmo.client` and :mod:`llmo.aio` differ only in how they send and sleep.
"""

from __future__ import annotations

import base64
import os
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx

from llmo.errors import ApiError, BadRequest, Conflict, RateLimited, ServiceUnavailable
from llmo.models import Message, StreamEvent

__version__ = "0.1.0"

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = f"llmo-client/{__version__}"
# Each long-poll request waits at most this long (the server's RESULT_WAIT_MAX_S is 60 by default).
LONG_POLL_S = 30.0
# A stream is quiet for at most the server's heartbeat (15 s) between events.
STREAM_READ_TIMEOUT_S = 60.0
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 30.0

# Failures before the request reached the server: safe to retry for any method.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class Settings:
    """A client's connection settings, resolved from the arguments and the environment."""

    base_url: str
    token: str | None
    timeout: float
    max_retries: int
    rate_limit_wait: float

    @classmethod
    def resolve(
        cls, base_url: str | None, token: str | None, timeout: float, max_retries: int, rate_limit_wait: float
    ) -> Settings:
        url = (base_url or os.environ.get("LLMO_URL") or DEFAULT_URL).rstrip("/")
        tok = token if token is not None else os.environ.get("LLMO_TOKEN") or None
        return cls(url, tok, float(timeout), max(0, int(max_retries)), max(0.0, float(rate_limit_wait)))

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.token:
            # Bearer takes user tokens and tenant API keys alike (docs/api.md, Authentication).
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers


def segment(value: str) -> str:
    """An id as one path segment (never a path of its own)."""
    return quote(str(value), safe="")


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def _image(value: str | bytes | Path) -> str:
    if isinstance(value, Path):
        value = value.read_bytes()
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    return value


def submit_body(
    prompt: str | None,
    *,
    messages: Sequence[Message | Mapping[str, str]] | None = None,
    images: Sequence[str | bytes | Path] | None = None,
    priority: str | None = None,
    model: str | None = None,
    backend: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    params: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    timeout_s: int | None = None,
    queue_timeout_s: int | None = None,
    requires_multimodal: bool | None = None,
    stream: bool | None = None,
) -> dict[str, Any]:
    """The ``POST /jobs`` body: only the fields given (the server names any problem with them).

    ``images`` may be base64 strings, ``data:`` URLs, raw bytes or paths (read and encoded here).
    """
    fields: dict[str, Any] = {
        "prompt": prompt,
        "messages": [dict(m) for m in messages] if messages is not None else None,
        "images": [_image(i) for i in images] if images is not None else None,
        "priority": priority,
        "model": model,
        "backend": backend,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "params": dict(params) if params is not None else None,
        "metadata": dict(metadata) if metadata is not None else None,
        "timeout_s": timeout_s,
        "queue_timeout_s": queue_timeout_s,
        "requires_multimodal": requires_multimodal,
        "stream": stream,
    }
    return {name: value for name, value in fields.items() if value is not None}


def list_params(**filters: Any) -> dict[str, str]:
    return {name: str(value) for name, value in filters.items() if value is not None and value != ""}


def cursor_of(link: str | None) -> str | None:
    """The ``cursor`` of a ``next``/``previous`` link (followed on our own base URL, whatever host it names)."""
    if not link:
        return None
    values = parse_qs(urlsplit(link).query).get("cursor")
    return values[0] if values else None


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: about 0.5, 1, 2, 4, 8 s."""
    return min(MAX_BACKOFF_S, 0.5 * 2**attempt) * random.uniform(0.5, 1.0)


def transport_retryable(exc: httpx.TransportError, idempotent: bool) -> bool:
    """A request that never left may always be sent again; one that may have been served only when repeating it
    cannot do anything twice (a GET, or a POST /jobs carrying its Idempotency-Key)."""
    return isinstance(exc, _NOT_SENT) or idempotent


class RetryBudget:
    """How one call retries: up to ``max_retries`` for connection errors and 503s (and an Idempotency-Key still
    in flight), and sleeps on 429 while the ``Retry-After`` values add up to at most ``rate_limit_wait`` s."""

    def __init__(self, max_retries: int, rate_limit_wait: float) -> None:
        self.max_retries = max_retries
        self.rate_left = rate_limit_wait
        self.attempt = 0

    def after_transport_error(self, exc: httpx.TransportError, idempotent: bool) -> float | None:
        if self.attempt >= self.max_retries or not transport_retryable(exc, idempotent):
            return None
        self.attempt += 1
        return backoff(self.attempt - 1)

    def after_error(self, err: ApiError, idempotent: bool) -> float | None:
        """Seconds to sleep before sending the request again, or ``None`` to raise ``err``."""
        if isinstance(err, RateLimited):
            wait = err.retry_after
            if wait is None or wait > self.rate_left:
                return None
            self.rate_left -= wait
            return wait
        in_flight = isinstance(err, Conflict) and "Idempotency-Key" in err.fields and idempotent
        if not (isinstance(err, ServiceUnavailable) or in_flight) or self.attempt >= self.max_retries:
            return None
        self.attempt += 1
        if err.retry_after is not None:
            return min(err.retry_after, MAX_RETRY_AFTER_S)
        return backoff(self.attempt - 1)


def long_poll_unsupported(err: ApiError) -> bool:
    """The server cannot long-poll: a WSGI server (501) or a ``wait`` over its limit (400 naming ``wait``)."""
    return err.status == 501 or (isinstance(err, BadRequest) and "wait" in err.fields)


def poll_delay(response: httpx.Response, poll_interval: float | None) -> float:
    if poll_interval is not None:
        return poll_interval
    try:
        return max(0.05, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


class SSEDecoder:
    """Server-Sent Events, one line at a time (the WHATWG rules that matter here)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> StreamEvent | None:
        """The event that ``line`` completes (a blank line), else ``None``."""
        if not line:
            if not self._data and not self._event:
                return None
            event = StreamEvent.parse(self._event, "\n".join(self._data), self._id)
            self._event, self._data, self._id = "", [], None
            return event
        if line.startswith(":"):  # a comment: the server's keep-alive
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


def file_name(file: Any, filename: str | None) -> str:
    if filename:
        return filename
    if isinstance(file, str | Path):
        return Path(file).name
    return Path(getattr(file, "name", "") or "batch.jsonl").name


def file_bytes(file: Any) -> bytes:
    """An upload's content: a path, bytes, or a binary file object (read whole, so a retry can send it again)."""
    if isinstance(file, str | Path):
        return Path(file).read_bytes()
    if isinstance(file, bytes | bytearray | memoryview):
        return bytes(file)
    data = file.read()
    return data.encode() if isinstance(data, str) else data
