"""Tool calls in OpenAI's shapes, whatever the backend speaks.

A finished call (``GenerationResult.tool_calls``, the job's ``tool_calls``) is OpenAI's message shape:
``{"id": "call_...", "type": "function", "function": {"name": "...", "arguments": "<JSON text>"}}``.
A streamed one arrives as chunk deltas ``{"index", "id", "type", "function": {"name", "arguments"}}``:
the first for an index carries id, type and name, later ones argument fragments to append
(:class:`Accumulator` puts them back together).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from workers.backends.base import GenerationRequest, GenerationResult


def normalize(calls: Any) -> list[dict[str, Any]]:
    """Finished tool calls from a server's message, in OpenAI's shape; anything unusable is dropped."""
    out: list[dict[str, Any]] = []
    for call in calls if isinstance(calls, list) else ():
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            continue
        out.append(finished(str(call.get("id") or f"call_{len(out)}"), str(fn["name"]), fn.get("arguments")))
    return out


def finished(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    """One call in OpenAI's message shape; arguments given as an object become JSON text."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def deltas_for(calls: Iterable[dict[str, Any]], first_index: int = 0) -> list[dict[str, Any]]:
    """Finished calls as stream deltas (one per call, complete): for servers that send whole calls."""
    return [
        {"index": first_index + i, "id": c["id"], "type": "function", "function": dict(c["function"])}
        for i, c in enumerate(calls)
    ]


class Accumulator:
    """Tool-call deltas of one streamed answer put together by ``index`` (arguments concatenated)."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, deltas: Any) -> list[dict[str, Any]]:
        """Take one chunk's ``delta.tool_calls``; returns them cleaned for the delta sink."""
        clean: list[dict[str, Any]] = []
        for d in deltas if isinstance(deltas, list) else ():
            if not isinstance(d, dict):
                continue
            index = d.get("index", len(self._calls))
            index = index if isinstance(index, int) else len(self._calls)
            fn = d.get("function") if isinstance(d.get("function"), dict) else {}
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            out: dict[str, Any] = {"index": index}
            if d.get("id"):
                call["id"] = out["id"] = str(d["id"])
                out["type"] = "function"
            fragment: dict[str, Any] = {}
            if fn.get("name"):
                call["name"] = fragment["name"] = str(fn["name"])
            arguments = fn.get("arguments")
            if arguments is not None:
                text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
                call["arguments"] += text
                fragment["arguments"] = text
            out["function"] = fragment
            clean.append(out)
        return clean

    def calls(self) -> list[dict[str, Any]]:
        """The finished calls, in index order (a call without a name is dropped: nothing could run it)."""
        return [
            finished(c["id"] or f"call_{i}", c["name"], c["arguments"] or "{}")
            for i, c in sorted(self._calls.items())
            if c["name"]
        ]


def emit_whole(request: GenerationRequest, result: GenerationResult) -> None:
    """A whole answer to the request's delta sink as one delta (a server that did not stream)."""
    delta: dict[str, Any] = {}
    if result.output:
        delta["content"] = result.output
    if result.tool_calls:
        delta["tool_calls"] = deltas_for(result.tool_calls)
    if delta:
        request.emit(delta)
