"""The one small interface every backend kind implements."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# Where an adapter sends output as it arrives: ``{"content": "..."}`` or, for tool calls, OpenAI's
# chunk shape ``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}`` (the
# first delta of a call carries its id, type and name; later ones argument fragments to append).
DeltaSink = Callable[[dict[str, Any]], None]


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
    # OpenAI's request fields, each None when the job did not set it; every adapter maps them to its
    # server (tools natively, response_format as Ollama's ``format``, the sampling ones as options).
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    top_p: float | None = None
    seed: int | None = None
    on_delta: DeltaSink | None = field(default=None, compare=False, repr=False)
    # Set when the job is canceled while running: adapters that can stop early check it and raise
    # JobCanceled (the dev backend's wait, Ollama's stream between chunks).
    cancel: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    def check_canceled(self) -> None:
        if self.cancel.is_set():
            raise JobCanceled(self.job_id)

    def emit(self, delta: dict[str, Any]) -> None:
        """Hand ``delta`` to the sink, if the caller gave one."""
        if self.on_delta is not None:
            self.on_delta(delta)


@dataclass(frozen=True)
class GenerationResult:
    output: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_ms: int
    # Server-side timings when the backend reports them (Ollama's *_duration fields, in ms).
    timings: dict[str, float] = field(default_factory=dict)
    # The calls the model asked for, in OpenAI's message shape ({"id", "type": "function",
    # "function": {"name", "arguments": JSON text}}); finish_reason is then "tool_calls".
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


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
