"""``openai``: any OpenAI-compatible chat API (OpenAI, vLLM, llama.cpp server, TGI) over ``httpx``.

``base_url`` ends with the API version, e.g. ``http://gpu1:8000/v1``; we ``POST {base_url}/chat/completions``.
``Authorization: Bearer`` is sent only when the backend has an API key, and the key never appears in an
error message or a log line (a server that echoes it back has it scrubbed).

Body fields merge, later winning: backend config ``params`` < the job's ``params`` < ``model``,
``messages``, ``max_tokens`` and ``temperature`` from the job, and the request's ``tools``,
``tool_choice``, ``response_format``, ``stop``, ``top_p`` and ``seed`` when set. ``model``, ``messages``, ``stream``,
``stream_options`` and ``n`` are never taken from params (we parse one choice). Config
``max_tokens_param`` renames ``max_tokens`` (OpenAI's newer models want ``max_completion_tokens``).

We stream (``"stream": true`` with ``stream_options.include_usage``) unless the backend's config says
``"stream": false``: a job canceled while its call runs stops at the next chunk, and closing the stream
makes the server stop generating (vLLM aborts a request whose client went away), so the GPU is not
spent on an answer nobody will read; the call's deadline is checked between chunks too. A stream
must end with a ``finish_reason`` (else the answer is truncated: an error); an ``error`` event in the
stream is classified like an error response; usage comes from the final usage chunk. A server that
answers a streamed request with one JSON object is read as such. Content and tool-call deltas go to
the request's delta sink as they arrive; tool-call deltas are put together by index
(``workers.backends.tools``) into the result's ``tool_calls``, and an answer with tool calls
finishes with "tool_calls" (unless it was cut at the token limit).
Messages pass through with their tool fields (an assistant's ``tool_calls``, a tool message's
``tool_call_id``, ``name``); content may be a string or content parts.
A multimodal job's last user message becomes content parts: its text plus one ``image_url`` data URL per
image, the MIME type sniffed from the bytes.

Errors accept both shapes: nested ``{"error": {"message", "type", "code"}}`` and vLLM's flat
``{"object": "error", "message", ...}`` (before 0.10.1). ``Retry-After`` (seconds or an HTTP date) and
``retry-after-ms`` are exposed as ``retry_after_s`` on the raised error. A 200 with no choices or no
``finish_reason`` is a truncated answer: an error, not a success.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import logging
import threading
import time
from typing import Any

import httpx

from workers.backends import image_refs, tools
from workers.backends import params as token_params
from workers.backends.base import BackendConfig, BackendError, GenerationRequest, GenerationResult
from workers.backends.outbound import refuse_unsafe, scrub, scrubbing, transport_summary

log = logging.getLogger(__name__)

RESERVED_PARAMS = frozenset({"model", "messages", "stream", "stream_options", "n"})
# GenerationRequest fields sent as body fields of the same name.
REQUEST_FIELDS = ("tools", "tool_choice", "response_format", "stop", "top_p", "seed")
# Message fields that pass through (OpenAI's roles system/user/assistant/tool).
MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id")
PARAM_ALIASES = {"num_predict": "max_tokens"}  # Ollama's name, so one job's params suit both kinds
MAX_RETRY_AFTER_S = 3600.0
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def backend_error(
    status: int | None, message: str, *, retryable: bool | None = None, retry_after_s: float | None = None
) -> BackendError:
    """A BackendError with ``retry_after_s`` set (None when the server gave none).

    ``base.BackendError`` has no such field yet; setting the attribute keeps every caller on one type,
    and callers read it with ``getattr(exc, "retry_after_s", None)`` until base.py grows it.
    """
    if status is not None and retryable is None:
        err = BackendError.from_status(status, message)
    else:
        err = BackendError(message, retryable=bool(retryable), status=status)
    err.retry_after_s = retry_after_s  # type: ignore[attr-defined]
    return err


class OpenAIAdapter:
    """Runs jobs on an OpenAI-compatible server; one pooled ``httpx.Client`` per base URL, shared by threads."""

    kind = "openai"

    def __init__(self) -> None:
        self._clients: dict[str, httpx.Client] = {}
        self._lock = threading.Lock()

    def client(self, base_url: str) -> httpx.Client:
        """The process's pooled client for ``base_url`` (connections are reused across jobs and threads)."""
        base = base_url.rstrip("/")
        with self._lock:
            client = self._clients.get(base)
            if client is None:
                client = self._clients[base] = httpx.Client(
                    base_url=base,
                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                    headers={"Accept": "application/json"},
                    follow_redirects=False,  # a redirect could point at an internal service
                )
            return client

    def generate(self, backend: BackendConfig, request: GenerationRequest) -> GenerationResult:
        with scrubbing(backend.api_key):
            return self._generate(backend, request)

    def _generate(self, backend: BackendConfig, request: GenerationRequest) -> GenerationResult:
        started = time.monotonic()
        timeout_s = min(request.timeout_s, backend.timeout_s)
        model = request.model or backend.model
        if not model:
            raise BackendError("No model: set one on the backend or the job.", retryable=False)
        if not backend.base_url:
            raise BackendError("The backend has no base URL.", retryable=False)
        refuse_unsafe(backend)
        body = build_body(backend, request, model)
        headers = {"Authorization": f"Bearer {backend.api_key}"} if backend.api_key else {}
        streamed = backend.config.get("stream", True) is not False
        if streamed:
            body["stream"], body["stream_options"] = True, {"include_usage": True}
        try:
            with self.client(backend.base_url).stream(
                "POST", "/chat/completions", json=body, headers=headers, timeout=timeout_s
            ) as response:
                if 300 <= response.status_code < 400:
                    raise redirect_error(response.status_code)
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response, backend.api_key)
                if streamed and response.headers.get("content-type", "").startswith("text/event-stream"):
                    return read_stream(response, request, backend.api_key, started, started + timeout_s)
                response.read()
        except httpx.TimeoutException:
            raise BackendError(f"Timed out after {timeout_s:g}s.", retryable=True) from None
        except httpx.TransportError as exc:
            message = scrub(f"Connection failed: {transport_summary(exc)}", backend.api_key)
            raise BackendError(message, retryable=True) from None
        try:
            data = response.json()
        except ValueError:
            raise BackendError("The server answered 200 with a body that is not JSON.", retryable=True) from None
        if not isinstance(data, dict):
            raise BackendError("The server answered 200 with a body that is not a JSON object.", retryable=True)
        if data.get("error") or data.get("object") == "error":
            raise error_from_body(data, None, backend.api_key)
        result = parse_completion(data, started)
        tools.emit_whole(request, result)  # not streamed: the sink gets the answer in one piece
        return result


def read_stream(
    response: httpx.Response, request: GenerationRequest, api_key: str, started: float, deadline: float
) -> GenerationResult:
    """The answer from a ``chat.completion.chunk`` event stream (see the module docstring).

    Leaving early (a cancel, the deadline, an error event) closes the response, and with it the
    connection: that is what tells the server to stop.
    """
    parts: list[str] = []
    calls = tools.Accumulator()
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    for line in response.iter_lines():
        request.check_canceled()
        if time.monotonic() > deadline:
            raise BackendError(f"Timed out after {deadline - started:g}s (streaming).", retryable=True)
        if not line.startswith("data:"):
            continue  # blank separators, ": keep-alive" comments, "event:" lines
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise BackendError("Malformed event in the server's stream (not JSON).", retryable=True) from None
        if not isinstance(chunk, dict):
            raise BackendError("Malformed event in the server's stream (not an object).", retryable=True)
        if chunk.get("error") or chunk.get("object") == "error":
            raise error_from_body(chunk, None, api_key)
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                delta = {}
            out: dict[str, Any] = {}
            content = delta.get("content")
            if isinstance(content, str) and content:
                parts.append(content)
                out["content"] = content
            if delta.get("tool_calls"):
                out["tool_calls"] = calls.add(delta["tool_calls"])
            if out:
                request.emit(out)
            finish_reason = choice.get("finish_reason") or finish_reason
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
    if not finish_reason:
        raise BackendError("The stream ended without a finish_reason: the answer is truncated.", retryable=True)
    return completion_result("".join(parts), finish_reason, usage, started, calls.calls())


def build_body(backend: BackendConfig, request: GenerationRequest, model: str) -> dict[str, Any]:
    """The ``/chat/completions`` body for a job (see the module docstring for the merge order)."""
    body: dict[str, Any] = {}
    for source in (backend.config.get("params") or {}, request.params):
        for name, value in source.items():
            name = PARAM_ALIASES.get(name, name)
            if name in RESERVED_PARAMS:
                log.debug("ignored reserved param", extra={"param": name, "job_id": request.job_id})
                continue
            body[name] = value
    body["model"] = model
    body["messages"] = build_messages(request)
    max_tokens_param = str(backend.config.get("max_tokens_param") or "max_tokens")
    if max_tokens_param != "max_tokens" and "max_tokens" in body:
        body[max_tokens_param] = body.pop("max_tokens")
    if request.max_tokens is not None:
        body[max_tokens_param] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    for name in REQUEST_FIELDS:
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if body.get("tool_choice") is not None and not body.get("tools"):
        del body["tool_choice"]  # OpenAI refuses a tool_choice without tools
    return token_params.clamp(body, *token_params.caps())


def redirect_error(status: int) -> BackendError:
    """Redirects are not followed (one could lead to an internal service); the base URL must be the server's."""
    return BackendError(
        f"HTTP {status} redirect not followed: set the backend's base URL to the server itself.", retryable=False
    )


def build_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """The job's messages; with images, the last user message's content becomes text + image_url parts."""
    messages: list[dict[str, Any]] = [
        {
            "role": m.get("role", "user"),
            "content": list(m["content"]) if isinstance(m.get("content"), list) else m.get("content", ""),
            **{k: m[k] for k in MESSAGE_FIELDS if m.get(k) is not None},
        }
        for m in request.messages
    ]
    loose = image_refs.place(messages, request.images, data_url)
    if not loose:
        return messages
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        messages.append({"role": "user", "content": ""})
        users = [len(messages) - 1]
    target = messages[users[-1]]
    content = target["content"]
    parts: list[dict[str, Any]] = (
        list(content) if isinstance(content, list) else [{"type": "text", "text": str(content or "")}]
    )
    parts += [{"type": "image_url", "image_url": {"url": data_url(img)}} for img in loose]
    target["content"] = parts
    return messages


def data_url(image_b64: str) -> str:
    """``data:image/<fmt>;base64,...`` for a base64 image; the format is sniffed from its first bytes."""
    text = image_b64.strip()
    if text.startswith("data:"):
        return text
    try:
        head = base64.b64decode(text[:24], validate=True)
    except (binascii.Error, ValueError):
        raise BackendError("An image is not valid base64.", retryable=False) from None
    return f"data:{sniff_image_type(head)};base64,{text}"


def sniff_image_type(head: bytes) -> str:
    """The MIME type of an image from its magic bytes (PNG when unknown: the serializer already vetted it)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _IMAGE_MAGIC:
        if head.startswith(magic):
            return mime
    return "image/png"


def parse_completion(data: dict[str, Any], started: float) -> GenerationResult:
    """A result from a chat.completion object; no choice or no finish_reason means a truncated answer."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendError("The server answered with no choices.", retryable=True)
    choice = choices[0]
    finish_reason = choice.get("finish_reason")
    if not finish_reason:
        raise BackendError("The answer has no finish_reason: it is truncated.", retryable=True)
    message = choice.get("message") or {}
    if not isinstance(message, dict):
        message = {}
    content = message.get("content")
    calls = tools.normalize(message.get("tool_calls"))
    output = content if isinstance(content, str) else ""
    return completion_result(output, finish_reason, data.get("usage"), started, calls)


def completion_result(
    output: str, finish_reason: Any, usage: Any, started: float, tool_calls: list[dict[str, Any]] | None = None
) -> GenerationResult:
    """The result of a finished answer, streamed or not; a server that reports no usage records zero tokens."""
    if not isinstance(usage, dict) or not usage:
        log.warning("server reported no usage; recording zero tokens")
        usage = {}
    if tool_calls and finish_reason != "length":
        finish_reason = "tool_calls"  # some servers say "stop" (or "function_call") with calls
    return GenerationResult(
        output=output,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        finish_reason=str(finish_reason),
        latency_ms=int((time.monotonic() - started) * 1000),
        tool_calls=tool_calls or [],
    )


def error_from_response(response: httpx.Response, api_key: str = "") -> BackendError:
    """A classified error from a non-2xx response, in either body shape, with Retry-After."""
    try:
        data = response.json()
    except ValueError:
        data = None
    retry_after = parse_retry_after(response.headers)
    if isinstance(data, dict):
        return error_from_body(data, response.status_code, api_key, retry_after)
    text = response.text.strip()[:300] or response.reason_phrase or "error"
    return backend_error(response.status_code, scrub(text, api_key), retry_after_s=retry_after)


def error_from_body(
    data: dict[str, Any], status: int | None, api_key: str = "", retry_after_s: float | None = None
) -> BackendError:
    """Nested ``{"error": {...}}``, flat ``{"object": "error", ...}`` or TGI's ``{"error": "..."}``."""
    err = data.get("error")
    if isinstance(err, dict):
        message, code = err.get("message"), err.get("code")
    elif isinstance(err, str):
        message, code = err, None
    else:
        message, code = data.get("message"), data.get("code")
    if status is None:  # an error object inside a 200: trust its numeric code, else assume server-side
        status = code if isinstance(code, int) and 400 <= code <= 599 else None
    text = scrub(str(message or "The server returned an error."), api_key)
    if status is None:
        return backend_error(None, text, retryable=True, retry_after_s=retry_after_s)
    return backend_error(status, text, retry_after_s=retry_after_s)


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (delta-seconds or HTTP date), capped."""
    value: float | None = None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = None
    raw = headers.get("retry-after")
    if value is None and raw:
        try:
            value = float(raw)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                when = None
            if when is not None and when.tzinfo is not None:
                value = when.timestamp() - time.time()
    if value is None or value != value:  # NaN
        return None
    return min(max(value, 0.0), MAX_RETRY_AFTER_S)
