"""A fake OpenAI-compatible server (the shape OpenAI, vLLM, llama.cpp server and TGI share).

Endpoints: ``POST /v1/chat/completions`` (one JSON object, or SSE ``data: {...}`` chunks ending with
``data: [DONE]`` when ``"stream": true``; a usage chunk when ``stream_options.include_usage``),
``GET /v1/models`` and llama.cpp's ``GET /health``. The model "generates" the text of the last user
message back (or ``reply``), limited by ``max_tokens``/``max_completion_tokens`` (then ``finish_reason``
is "length"); token counts are whitespace words.

Errors: ``error_style="nested"`` answers ``{"error": {"message", "type", "param", "code"}}`` (OpenAI,
vLLM >= 0.10.1); ``"flat"`` answers ``{"object": "error", "message", "type", "param", "code"}`` (vLLM
before 0.10.1). 404 for an unknown model, 400 for a bad request, 401 for a wrong key when ``api_key`` is
set (the message echoes the key it got, as careless servers do, so tests can prove we never repeat it),
failure knobs default to 503; ``retry_after`` adds a ``Retry-After`` header to those failures.
``loading=True`` answers 503 "Loading model" everywhere, as llama.cpp does while loading weights.
Shape knobs for broken servers: ``omit_finish_reason``, ``empty_choices``, ``omit_usage``; for streams,
``truncate_after=N`` ends the stream after N content chunks (no finish_reason, no ``[DONE]``) and
``error_after=N`` sends N content chunks then ``data: {"error": {...}}`` (code ``fail_status``), as vLLM
reports a failure after streaming began. ``chunk_delay_s`` paces the content chunks.

Tools: with ``tool_calls=[{"name", "arguments"}...]`` (arguments an object or JSON text) the model
calls those tools whenever the request offers ``tools`` (and ``tool_choice`` is not "none"): the
message has no content and ``tool_calls`` (ids ``call_fake<n>``), finish_reason "tool_calls". Streamed
as OpenAI does: per call, a first delta with index, id, type, name and empty arguments, then the
arguments in fragments of ``arguments_chunk`` characters. ``response_format`` json_object/json_schema
without a ``reply`` answers ``{"echo": <last user message>}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

from tests.fakes import FakeHandler, FakeServer, RecordedRequest, word_count

_FAIL = {
    429: ("Rate limit reached for requests. Please try again later.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


class OpenAIFake(FakeServer):
    generation_paths = frozenset({"/v1/chat/completions"})

    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("gpt-test", "llava-test"),
        api_key: str | None = None,
        error_style: str = "nested",
        reply: str | None = None,
        loading: bool = False,
        chunk_delay_s: float = 0.0,
        omit_finish_reason: bool = False,
        empty_choices: bool = False,
        omit_usage: bool = False,
        truncate_after: int | None = None,
        error_after: int | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        arguments_chunk: int = 4,
        **knobs: Any,
    ) -> None:
        super().__init__(**knobs)
        assert error_style in ("nested", "flat")
        self.tool_calls = tool_calls
        self.arguments_chunk = arguments_chunk
        self.models = tuple(models)
        self.api_key = api_key
        self.error_style = error_style
        self.reply = reply
        self.loading = loading
        self.chunk_delay_s = chunk_delay_s
        self.omit_finish_reason = omit_finish_reason
        self.empty_choices = empty_choices
        self.omit_usage = omit_usage
        self.truncate_after = truncate_after
        self.error_after = error_after
        self._ids = 0

    @property
    def base_url(self) -> str:
        """What a client is configured with: the server root plus ``/v1``."""
        return f"{self.url}/v1"

    # --- routing -------------------------------------------------------------------
    def handle(self, h: FakeHandler, req: RecordedRequest) -> None:
        if self.loading:  # llama.cpp answers every endpoint this way until the model is loaded
            body = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
            return h.send_json(503, body)
        route = (req.method, req.path)
        if route == ("GET", "/health"):
            return h.send_json(200, {"status": "ok"})
        if req.path.startswith("/v1/") and self.api_key is not None:
            got = req.headers.get("authorization", "")
            if got != f"Bearer {self.api_key}":
                key = got.removeprefix("Bearer ")
                return self.error(
                    h, 401, f"Incorrect API key provided: {key}.", "invalid_request_error", "invalid_api_key"
                )
        if route == ("GET", "/v1/models"):
            data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"} for m in self.models]
            return h.send_json(200, {"object": "list", "data": data})
        if route == ("POST", "/v1/chat/completions"):
            return self._chat(h, req)
        return self.error(h, 404, f"Route {req.method} {req.path} not found", "not_found_error", None)

    def error(
        self,
        h: FakeHandler,
        status: int,
        message: str,
        type_: str,
        code: Any,
        headers: dict[str, str] | None = None,
    ) -> None:
        if self.error_style == "flat":
            body = {"object": "error", "message": message, "type": type_, "param": None, "code": status}
        else:
            body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        h.send_json(status, body, headers)

    # --- chat ----------------------------------------------------------------------
    def _calls(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The tool calls this answer makes: the knob's, when the request offers tools it may call."""
        if not self.tool_calls or not body.get("tools") or body.get("tool_choice") == "none":
            return []
        with self._lock:
            self._ids += 1
            first = self._ids * 10
        return _calls_for(self.tool_calls, first)

    def _chat(self, h: FakeHandler, req: RecordedRequest) -> None:
        bad = "invalid_request_error"
        if req.json_error is not None:
            return self.error(h, 400, f"We could not parse the JSON body: {req.json_error}", bad, None)
        body = req.body
        if not isinstance(body, dict):
            return self.error(h, 400, "The request body must be a JSON object.", bad, None)
        model = body.get("model")
        if not model:
            return self.error(h, 400, "you must provide a model parameter", bad, None)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return self.error(h, 400, "'messages' is a required property", bad, None)
        if self.should_fail():
            status = self.fail_status
            message, type_, code = _FAIL.get(status, ("Injected failure.", "server_error", None))
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else None
            return self.error(h, status, self.fail_message or message, type_, code, headers)
        if model not in self.models:
            return self.error(h, 404, f"The model `{model}` does not exist.", bad, "model_not_found")

        texts: list[str] = []
        last_user = ""
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                parts_text = []
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text":
                        parts_text.append(str(part.get("text", "")))
                    elif kind == "image_url":
                        problem = _check_image_url(part.get("image_url"))
                        if problem:
                            return self.error(h, 400, problem, bad, None)
                    else:
                        return self.error(h, 400, f"Unsupported content part type: {kind!r}", bad, None)
                text = " ".join(parts_text)
            elif isinstance(content, str) or content is None:
                text = content or ""
            else:
                return self.error(h, 400, "Invalid type for 'messages[].content'.", bad, None)
            texts.append(text)
            if m.get("role") == "user":
                last_user = text

        reply = self.reply
        if reply is None and (body.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
            reply = json.dumps({"echo": last_user})
        words = (reply if reply is not None else last_user).split()
        calls = self._calls(body)
        if calls:
            words = []
        finish_reason = "tool_calls" if calls else "stop"
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(limit, int) and 0 <= limit < len(words):
            words, finish_reason = words[:limit], "length"
        usage = {
            "prompt_tokens": sum(word_count(t) for t in texts),
            "completion_tokens": len(words),
            "total_tokens": sum(word_count(t) for t in texts) + len(words),
        }
        with self._lock:
            self._ids += 1
            completion_id = f"chatcmpl-fake{self._ids}"
        head = {"id": completion_id, "created": int(time.time()), "model": model}
        if body.get("stream"):
            return self._stream(h, head, words, finish_reason, usage, body, calls)
        message: dict[str, Any] = {"role": "assistant", "content": " ".join(words)}
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": None if self.omit_finish_reason else finish_reason,
        }
        out: dict[str, Any] = {**head, "object": "chat.completion", "choices": [] if self.empty_choices else [choice]}
        if not self.omit_usage:
            out["usage"] = usage
        h.send_json(200, out)
        return None

    def _stream(
        self,
        h: FakeHandler,
        head: dict[str, Any],
        words: list[str],
        finish_reason: str,
        usage: dict[str, int],
        body: dict[str, Any],
        calls: list[dict[str, Any]],
    ) -> None:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                chunk["usage"] = None
            h.write_chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        h.start_stream(200, "text/event-stream; charset=utf-8")
        event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        for i, word in enumerate(words):
            if i == self.truncate_after:
                h.end_stream()
                return
            if i == self.error_after:
                message = self.fail_message or _FAIL.get(self.fail_status, ("error", "server_error", None))[0]
                error = {"message": message, "type": "server_error", "param": None, "code": self.fail_status}
                h.write_chunk(b"data: " + json.dumps({"error": error}).encode() + b"\n\n")
                h.end_stream()
                return
            if self.chunk_delay_s:
                self.pause(self.chunk_delay_s)
            delta = {"content": word if i == 0 else f" {word}"}
            event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
        for index, call in enumerate(calls):
            fn = call["function"]
            first = {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": fn["name"], "arguments": ""},
            }
            event([{"index": 0, "delta": {"tool_calls": [first]}, "logprobs": None, "finish_reason": None}])
            args, size = fn["arguments"], max(1, self.arguments_chunk)
            for start in range(0, len(args), size):
                if self.chunk_delay_s:
                    self.pause(self.chunk_delay_s)
                part = {"index": index, "function": {"arguments": args[start : start + size]}}
                event([{"index": 0, "delta": {"tool_calls": [part]}, "logprobs": None, "finish_reason": None}])
        final_reason = None if self.omit_finish_reason else finish_reason
        event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": final_reason}])
        if include_usage and not self.omit_usage:
            event([], usage=usage)
        h.write_chunk(b"data: [DONE]\n\n")
        h.end_stream()


def _calls_for(specs: list[dict[str, Any]], first_id: int) -> list[dict[str, Any]]:
    out = []
    for i, spec in enumerate(specs):
        args = spec.get("arguments", {})
        text = args if isinstance(args, str) else json.dumps(args)
        out.append(
            {
                "id": f"call_fake{first_id + i}",
                "type": "function",
                "function": {"name": spec["name"], "arguments": text},
            }
        )
    return out


def _check_image_url(image_url: Any) -> str | None:
    """Why an ``image_url`` part is malformed (None when it is fine): a data URL must hold base64."""
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        return "image_url.url must be a string"
    if url.startswith(("http://", "https://")):
        return None
    header, sep, data = url.partition(",")
    if not (sep and header.startswith("data:image/") and header.endswith(";base64")):
        return "image_url.url must be an http(s) URL or a data:image/...;base64 URL"
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return "Invalid base64 image data"
    return None
