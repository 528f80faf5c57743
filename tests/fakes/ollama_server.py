"""A fake Ollama server speaking the real REST protocol (https://github.com/ollama/ollama/blob/main/docs/api.md).

Endpoints: ``GET /`` ("Ollama is running"), ``GET /api/version``, ``GET /api/tags``, ``POST /api/show``,
``POST /api/chat`` and ``POST /api/generate`` — NDJSON streaming by default, one JSON object when
``"stream": false``. Errors are ``{"error": "..."}`` with Ollama's status codes: 400 bad request,
404 unknown model ("model "x" not found, try pulling it first"), 503 "server busy" (the failure knobs'
default). The model "generates" the last user message back, word by word (or ``reply``), honouring
``options.num_predict`` (then ``done_reason`` is "length"); token counts are whitespace words.

Extra knobs: ``chunk_delay_s`` between streamed lines; ``error_after=N`` sends N content lines, then a
``{"error": ...}`` line on the 200 response (how Ollama reports a failure after streaming began);
``truncate_after=N`` ends the stream after N content lines with no ``done`` line (``truncate_mode``
"clean" finishes the chunked body, "drop" cuts the connection).

Tools: with ``tool_calls=[{"name", "arguments": {...}}]`` a chat that offers ``tools`` gets those
calls as Ollama sends them: one message line whose ``tool_calls`` hold whole calls (no id, arguments
an object), no content, then the ``done`` line with done_reason "stop". ``format`` ("json" or a
schema) without a ``reply`` answers ``{"echo": <last user message>}``.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any

from tests.fakes import FakeHandler, FakeServer, RecordedRequest, word_count

DEFAULT_MODELS: dict[str, list[str]] = {
    "llama3.2:latest": ["completion", "tools"],
    "llava:latest": ["completion", "vision"],
}

_FAIL_MESSAGES = {
    503: "server busy, please try again.  maximum pending requests exceeded",
    429: "too many requests",
    500: "an error was encountered while running the model: unexpected EOF",
}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class OllamaFake(FakeServer):
    generation_paths = frozenset({"/api/chat", "/api/generate"})

    def __init__(
        self,
        *,
        models: dict[str, list[str]] | None = None,
        reply: str | None = None,
        version: str = "0.12.6",
        chunk_delay_s: float = 0.0,
        error_after: int | None = None,
        error_message: str = "an error was encountered while running the model: CUDA error: out of memory",
        truncate_after: int | None = None,
        truncate_mode: str = "clean",
        tool_calls: list[dict[str, Any]] | None = None,
        **knobs: Any,
    ) -> None:
        super().__init__(**knobs)
        self.tool_calls = tool_calls
        self.models = dict(DEFAULT_MODELS if models is None else models)
        self.reply = reply
        self.version = version
        self.chunk_delay_s = chunk_delay_s
        self.error_after = error_after
        self.error_message = error_message
        self.truncate_after = truncate_after
        self.truncate_mode = truncate_mode

    # --- routing -------------------------------------------------------------------
    def handle(self, h: FakeHandler, req: RecordedRequest) -> None:
        route = (req.method, req.path)
        if route == ("GET", "/"):
            h.send_bytes(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif route == ("GET", "/api/version"):
            h.send_json(200, {"version": self.version})
        elif route == ("GET", "/api/tags"):
            h.send_json(200, {"models": [self._tag(name) for name in self.models]})
        elif route == ("POST", "/api/show"):
            self._show(h, req)
        elif route == ("POST", "/api/chat"):
            self._generate(h, req, chat=True)
        elif route == ("POST", "/api/generate"):
            self._generate(h, req, chat=False)
        else:  # Ollama's router answers unknown routes (and wrong methods) with a plain-text 404
            h.send_bytes(404, b"404 page not found", "text/plain")

    def resolve(self, name: str) -> str | None:
        """Ollama's name matching: a name without a tag means ``:latest``."""
        if name in self.models:
            return name
        tagged = name if ":" in name else f"{name}:latest"
        return tagged if tagged in self.models else None

    @staticmethod
    def error(h: FakeHandler, status: int, message: str) -> None:
        h.send_json(status, {"error": message})

    # --- endpoints -----------------------------------------------------------------
    def _tag(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-10-01T12:00:00.000000000Z",
            "size": 2019393189,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
        }

    def _show(self, h: FakeHandler, req: RecordedRequest) -> None:
        body = req.body if isinstance(req.body, dict) else {}
        name = body.get("model") or body.get("name")  # "name" is the older spelling
        if not name:
            return self.error(h, 400, "model is required")
        resolved = self.resolve(name)
        if resolved is None:
            return self.error(h, 404, f"model '{name}' not found")
        h.send_json(
            200,
            {
                "modelfile": f"FROM {resolved}\n",
                "parameters": 'stop                           "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": self._tag(resolved)["details"],
                "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
                "capabilities": list(self.models[resolved]),
                "modified_at": "2025-10-01T12:00:00.000000000Z",
            },
        )
        return None

    def _generate(self, h: FakeHandler, req: RecordedRequest, *, chat: bool) -> None:
        if req.json_error is not None:
            return self.error(h, 400, f"invalid character in request body: {req.json_error}")
        body = req.body
        if not isinstance(body, dict):
            return self.error(h, 400, "json: cannot unmarshal into Go value of type api.ChatRequest")
        model = body.get("model")
        if not model:
            return self.error(h, 400, "model is required")
        if self.should_fail():
            status = self.fail_status
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else None
            h.send_json(status, {"error": self.fail_message or _FAIL_MESSAGES.get(status, "error")}, headers)
            return None
        resolved = self.resolve(model)
        if resolved is None:
            return self.error(h, 404, f'model "{model}" not found, try pulling it first')

        if chat:
            messages = body.get("messages") or []
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                return self.error(h, 400, "json: cannot unmarshal messages")
            images = [img for m in messages for img in (m.get("images") or [])]
            texts = [str(m.get("content") or "") for m in messages]
            users = [m for m in messages if m.get("role") == "user"]
            prompt_text = str(users[-1].get("content") or "") if users else ""
        else:
            images = list(body.get("images") or [])
            prompt_text = str(body.get("prompt") or "")
            texts = [prompt_text, str(body.get("system") or "")]
        for image in images:
            try:
                base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError, TypeError):
                return self.error(h, 400, "illegal base64 data at input byte 0")
        if images and "vision" not in self.models[resolved]:
            return self.error(h, 500, f"model {resolved} does not support images")

        options = body.get("options") or {}
        reply = self.reply
        if reply is None and body.get("format"):
            reply = json.dumps({"echo": prompt_text})
        calls = [
            {"function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in (self.tool_calls if chat and body.get("tools") else None) or ()
        ]
        if calls:
            reply = ""
        words = (reply if reply is not None else prompt_text).split()
        done_reason = "stop"
        limit = options.get("num_predict")
        if isinstance(limit, int) and 0 <= limit < len(words):
            words, done_reason = words[:limit], "length"
        stats = {
            "total_duration": 5_000_000 + 1_000_000 * len(words),
            "load_duration": 1_000_000,
            "prompt_eval_count": sum(word_count(t) for t in texts),
            "prompt_eval_duration": 2_000_000,
            "eval_count": len(words),
            "eval_duration": 1_000_000 * len(words),
        }
        key = "message" if chat else "response"

        def piece(text: str) -> Any:
            return {"role": "assistant", "content": text} if chat else text

        if body.get("stream", True) is False:
            final = {"model": model, "created_at": _now(), key: piece(" ".join(words))}
            if calls:
                final[key]["tool_calls"] = calls
            h.send_json(200, {**final, "done_reason": done_reason, "done": True, **stats})
            return None

        h.start_stream(200, "application/x-ndjson")
        for i, word in enumerate(words):
            if self.error_after is not None and i >= self.error_after:
                break
            if self.truncate_after is not None and i >= self.truncate_after:
                break
            if self.chunk_delay_s:
                self.pause(self.chunk_delay_s)
            line = {"model": model, "created_at": _now(), key: piece(word if i == 0 else f" {word}"), "done": False}
            h.write_chunk(json.dumps(line).encode() + b"\n")
        if calls:
            message = {"role": "assistant", "content": "", "tool_calls": calls}
            h.write_chunk(
                json.dumps({"model": model, "created_at": _now(), key: message, "done": False}).encode() + b"\n"
            )
        if self.error_after is not None:
            h.write_chunk(json.dumps({"error": self.error_message}).encode() + b"\n")
        elif self.truncate_after is not None:
            if self.truncate_mode == "drop":
                return h.drop()
        else:
            last = {"model": model, "created_at": _now(), key: piece(""), "done_reason": done_reason, "done": True}
            h.write_chunk(json.dumps({**last, **stats}).encode() + b"\n")
        h.end_stream()
        return None
