"""``dev``: a deterministic built-in backend for demos, tests and benchmarks.

The output is the prompt (or the last user message; of content parts, its text parts joined)
unchanged, streamed word by word to the request's delta sink. Config:
``latency_ms`` (wait per call; a cancel ends the wait), ``token_ms`` (wait before each word after the
first: a cancel or the deadline stops the stream between words), ``hang_ms`` (a stuck call that ignores
its timeout and any cancel, to exercise the worker's watchdog), ``fail_rate`` (0..1, decided by a
hash of job id and attempt, so a run is reproducible) and ``fail_status`` (the HTTP-like status
of those failures; 5xx/429 are retryable, other 4xx permanent).
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

from workers.backends.base import (
    BackendConfig,
    BackendError,
    GenerationRequest,
    GenerationResult,
)


def count_tokens(text: str) -> int:
    return len(text.split())


def content_text(content: Any) -> str:
    """A message's text: a string as is; of content parts (OpenAI's), the ``text`` parts joined by spaces."""
    if isinstance(content, list):
        texts = (str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
        return " ".join(texts)
    return "" if content is None else str(content)


def pieces(text: str) -> list[str]:
    """``text`` as word deltas (each word with the whitespace before it) that join back to ``text``."""
    found = re.findall(r"\s*\S+", text)
    if not found:
        return [text] if text else []
    found[-1] += text[sum(map(len, found)) :]  # trailing whitespace rides on the last word
    return found


def _roll(job_id: str, attempt: int) -> float:
    digest = hashlib.sha256(f"{job_id}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class DevAdapter:
    kind = "dev"

    def generate(self, backend: BackendConfig, request: GenerationRequest) -> GenerationResult:
        started = time.monotonic()
        cfg = backend.config
        latency_s = float(cfg.get("latency_ms", 0)) / 1000
        hang_s = float(cfg.get("hang_ms", 0)) / 1000
        if hang_s:
            time.sleep(hang_s)  # a stuck call: ignores its timeout and the cancel (the watchdog's case)
        # Waiting on the cancel event instead of sleeping: a canceled job stops at once.
        if latency_s > request.timeout_s:
            request.cancel.wait(request.timeout_s)
            request.check_canceled()
            raise BackendError(f"dev backend timed out after {request.timeout_s:g}s", retryable=True)
        if latency_s:
            request.cancel.wait(latency_s)
            request.check_canceled()
        fail_rate = float(cfg.get("fail_rate", 0))
        if fail_rate and _roll(request.job_id, request.attempt) < fail_rate:
            status = int(cfg.get("fail_status", 503))
            raise BackendError.from_status(status, f"dev backend injected failure (HTTP {status})")

        users = [m for m in request.messages if m.get("role") == "user"] or request.messages
        text = content_text(users[-1].get("content", "")) if users else ""
        words = text.split()
        finish_reason = "stop"
        if request.max_tokens is not None and len(words) > request.max_tokens:
            text = " ".join(words[: request.max_tokens])
            finish_reason = "length"
        self.stream(text, float(cfg.get("token_ms", 0)) / 1000, request, started)
        prompt_tokens = sum(count_tokens(content_text(m.get("content", ""))) for m in request.messages)
        return GenerationResult(
            output=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=count_tokens(text),
            finish_reason=finish_reason,
            latency_ms=int((time.monotonic() - started) * 1000),
        )

    @staticmethod
    def stream(text: str, token_s: float, request: GenerationRequest, started: float) -> None:
        """Send ``text`` to the sink word by word, ``token_s`` apart; stop at a cancel or the deadline."""
        if request.on_delta is None and not token_s:
            return
        deadline = started + request.timeout_s
        for i, piece in enumerate(pieces(text)):
            if i and token_s:
                if time.monotonic() + token_s > deadline:
                    request.cancel.wait(max(deadline - time.monotonic(), 0))
                    request.check_canceled()
                    raise BackendError(f"dev backend timed out after {request.timeout_s:g}s", retryable=True)
                request.cancel.wait(token_s)
            request.check_canceled()
            request.emit({"content": piece})
