"""Token-count parameters under every backend kind's name, and their caps.

A job's ``params`` pass through to the backend, so ``MAX_OUTPUT_TOKENS`` would mean nothing if
``params.num_predict`` (Ollama; ``-1`` is "until the context is full") or ``max_completion_tokens``
(OpenAI) could ask for more. The API refuses such params (:func:`problems`) and every adapter clamps
what it sends (:func:`clamp`), for rows written before the check and for backend config params.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# Output length: OpenAI-compatible, OpenAI's newer models, Ollama, TGI/transformers, OpenAI Responses.
OUTPUT_TOKEN_PARAMS = frozenset(
    {"max_tokens", "max_completion_tokens", "num_predict", "max_new_tokens", "max_output_tokens"}
)
# Context window: Ollama's num_ctx, llama.cpp's n_ctx.
CONTEXT_TOKEN_PARAMS = frozenset({"num_ctx", "n_ctx"})
# Where a nested dict of options travels inside params (Ollama's ``options``).
NESTED = ("options",)


def caps() -> tuple[int, int]:
    """``(MAX_OUTPUT_TOKENS, MAX_CONTEXT_TOKENS)`` from the settings (defaults when unset)."""
    from django.conf import settings  # here, so the adapters import without configured settings

    limits = getattr(settings, "JOB_LIMITS", {})
    return int(limits.get("max_tokens", 32_768)), int(limits.get("context_tokens", 131_072))


def _token_items(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    for name, value in params.items():
        if name in OUTPUT_TOKEN_PARAMS or name in CONTEXT_TOKEN_PARAMS:
            yield f"{prefix}{name}", name, value
        elif name in NESTED and isinstance(value, Mapping) and not prefix:
            yield from _token_items(value, f"{name}.")


def problems(params: Mapping[str, Any], max_output: int, max_context: int) -> dict[str, str]:
    """``{param path: message}`` for every token-count param that is not an integer within its cap."""
    found: dict[str, str] = {}
    for path, name, value in _token_items(params):
        output = name in OUTPUT_TOKEN_PARAMS
        cap, what = (max_output, "MAX_OUTPUT_TOKENS") if output else (max_context, "MAX_CONTEXT_TOKENS")
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
            found[path] = f"Must be an integer from 1 to {cap} ({what})."
    return found


def clamp(values: dict[str, Any], max_output: int, max_context: int) -> dict[str, Any]:
    """``values`` (a request body or an options dict the adapter built) with every token-count entry
    brought within its cap, in place and returned.

    A value that is not a positive integer (Ollama's -1/-2 mean "no limit") becomes the cap itself.
    """
    for name, value in values.items():
        if name in OUTPUT_TOKEN_PARAMS or name in CONTEXT_TOKEN_PARAMS:
            cap = max_output if name in OUTPUT_TOKEN_PARAMS else max_context
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            values[name] = min(value, cap) if ok else cap
    return values
