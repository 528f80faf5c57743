"""The one small interface every backend kind implements."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GenerationRequest:
    """What an adapter needs to run one job (no ORM object crosses this line)."""

    job_id: str
    messages: list[dict[str, Any]]
    images: list[str] = field(default_factory=list)
    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 60.0
    attempt: int = 1
    # Set when the job is canceled while running: adapters that can stop early check it and raise
    # JobCanceled (the dev backend's wait, Ollama's stream between chunks).
    cancel: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    def check_canceled(self) -> None:
        if self.cancel.is_set():
            raise JobCanceled(self.job_id)


@dataclass(frozen=True)
class GenerationResult:
    output: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_ms: int
    # Server-side timings when the backend reports them (Ollama's *_duration fields, in ms).
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendConfig:
    """A backend record as an adapter sees it."""

    name: str
    kind: str
    base_url: str = ""
    model: str = ""
    api_key: str = ""
    timeout_s: float = 60.0
    config: dict[str, Any] = field(default_factory=dict)


class BackendError(Exception):
    """A failed backend call. ``retryable`` says whether trying again (here or elsewhere) may help;
    ``retry_after_s`` is the server's own hint (``Retry-After``), which a retry should not undercut."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s

    @classmethod
    def from_status(cls, status: int, message: str, *, retry_after_s: float | None = None) -> BackendError:
        """HTTP semantics: 408, 429 and 5xx may pass; other 4xx will fail again the same way."""
        retryable = status in (408, 429) or status >= 500
        return cls(message, retryable=retryable, status=status, retry_after_s=retry_after_s)


class JobCanceled(Exception):
    """The job was canceled while its call ran; the adapter stopped early. Not a backend failure."""


class Adapter(Protocol):
    kind: str

    def generate(self, backend: BackendConfig, request: GenerationRequest) -> GenerationResult: ...
