"""``dev``: a deterministic built-in backend for demos, tests and benchmarks.

The output is the prompt (or the last user message) unchanged. Config:
``latency_ms`` (wait per call; a cancel ends the wait), ``hang_ms`` (a stuck call that ignores
its timeout and any cancel, to exercise the worker's watchdog), ``fail_rate`` (0..1, decided by a
hash of job id and attempt, so a run is reproducible) and ``fail_status`` (the HTTP-like status
of those failures; 5xx/429 are retryable, other 4xx permanent).
"""

from __future__ import annotations

import hashlib
import time

from workers.backends.base import (
    BackendConfig,
    BackendError,
    GenerationRequest,
    GenerationResult,
)


def count_tokens(text: str) -> int:
    return len(text.split())


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
        text = str(users[-1].get("content", "")) if users else ""
        words = text.split()
        finish_reason = "stop"
        if request.max_tokens is not None and len(words) > request.max_tokens:
            text = " ".join(words[: request.max_tokens])
            finish_reason = "length"
        prompt_tokens = sum(count_tokens(str(m.get("content", ""))) for m in request.messages)
        return GenerationResult(
            output=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=count_tokens(text),
            finish_reason=finish_reason,
            latency_ms=int((time.monotonic() - started) * 1000),
        )
