"""``ollama``: a local or remote Ollama server, through the official ``ollama`` client's ``/api/chat``.

Request: ``model`` is the job's model or the backend's; ``messages`` as given, with the job's images
(base64) attached to the last user message as Ollama expects; ``keep_alive`` from backend config.
``options`` are merged, later winning: backend config ``options`` < the job's ``params`` < the job's own
``max_tokens`` (as ``num_predict``) and ``temperature``. Job params are Ollama options (``top_p``,
``seed``, ``stop``, ``num_ctx``...; ``max_tokens`` is accepted as ``num_predict``), except ``format``
and ``think``, which are request fields; nothing in params can replace the model, messages or stream.
The request's OpenAI fields map to Ollama's: ``tools`` as they are (Ollama takes OpenAI's tool
objects; it has no ``tool_choice``, so "none" sends no tools and a named function sends only that
one), ``response_format`` as ``format`` ("json" for ``json_object``, the schema itself for
``json_schema``), ``stop``/``top_p``/``seed`` as options.

Messages: content parts become Ollama's text (the text parts joined) plus ``images`` (data URLs
decoded); an assistant's OpenAI ``tool_calls`` (arguments as JSON text) become Ollama's (arguments as
an object), and a tool message's ``tool_call_id`` becomes the called function's ``tool_name``.
Answers: Ollama sends each tool call whole, its arguments an object; they are returned and streamed
to the delta sink in OpenAI's shape (arguments as JSON text, ids ``call_<n>``), with finish_reason
"tool_calls" (Ollama itself says "stop").

We always stream, because Ollama reports a failure that happens after generation began as a 200 whose
last NDJSON line is ``{"error": ...}``: every line is checked (the client raises on it), and a stream
that ends without ``done: true`` is a truncated answer, i.e. an error, never a success.

Deadline: the call's sockets are bounded by ``min(request.timeout_s, backend.timeout_s)`` and the
stream is checked against the deadline and the job's cancel event on every line (closing the stream
stops Ollama's generation); the worker's watchdog is the hard backstop.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import httpx
import ollama
import pydantic

from workers.backends import image_refs, tools
from workers.backends import params as token_params
from workers.backends.base import BackendConfig, BackendError, GenerationRequest, GenerationResult
from workers.backends.outbound import refuse_unsafe, scrubbing, transport_summary

log = logging.getLogger(__name__)

# Request fields a job's params may set directly; every other param is an Ollama option.
REQUEST_FIELDS = ("format", "think")
# Portable names other kinds use, mapped to Ollama's.
OPTION_ALIASES = {"max_tokens": "num_predict"}
MAX_CLIENTS = 32


class OllamaAdapter:
    """Runs jobs on Ollama; holds one pooled client per (base_url, timeout, key), shared by threads."""

    kind = "ollama"

    def __init__(self) -> None:
        self._clients: OrderedDict[tuple[str, float, str], ollama.Client] = OrderedDict()
        self._lock = threading.Lock()

    def client(self, backend: BackendConfig, timeout_s: float) -> ollama.Client:
        """The cached client for this backend and timeout (the ``ollama`` client fixes its timeout at creation)."""
        # The key's digest, not the key, goes into the cache key: nothing here should print a secret.
        key_id = hashlib.sha256(backend.api_key.encode()).hexdigest()[:16] if backend.api_key else ""
        cache_key = (backend.base_url, float(timeout_s), key_id)
        with self._lock:
            client = self._clients.get(cache_key)
            if client is None:
                headers = {"authorization": f"Bearer {backend.api_key}"} if backend.api_key else None
                # The client follows redirects by default; one could lead to an internal service.
                client = ollama.Client(
                    host=backend.base_url, timeout=timeout_s, headers=headers, follow_redirects=False
                )
                self._clients[cache_key] = client
                # Bounded: job timeouts vary. An evicted client is not closed here because another
                # thread may be mid-call on it; the garbage collector closes its pool.
                while len(self._clients) > MAX_CLIENTS:
                    self._clients.popitem(last=False)
            else:
                self._clients.move_to_end(cache_key)
            return client

    def generate(self, backend: BackendConfig, request: GenerationRequest) -> GenerationResult:
        with scrubbing(backend.api_key):
            return self._generate(backend, request)

    def _generate(self, backend: BackendConfig, request: GenerationRequest) -> GenerationResult:
        started = time.monotonic()
        timeout_s = min(request.timeout_s, backend.timeout_s)
        deadline = started + timeout_s
        model = request.model or backend.model
        if not model:
            raise BackendError("No model: set one on the backend or the job.", retryable=False)
        if not backend.base_url:  # the client would silently fall back to OLLAMA_HOST or localhost
            raise BackendError("The backend has no base URL.", retryable=False)
        refuse_unsafe(backend)
        kwargs = build_chat_kwargs(backend, request, model)
        client = self.client(backend, timeout_s)

        try:  # the client validates the request eagerly; what it rejects will never pass
            stream = client.chat(stream=True, **kwargs)
        except (pydantic.ValidationError, ollama.RequestError) as exc:
            raise BackendError(f"Invalid request for Ollama: {_first_error(exc)}", retryable=False) from None

        parts: list[str] = []
        calls: list[dict[str, Any]] = []
        final: ollama.ChatResponse | None = None
        try:
            with contextlib.closing(stream):
                for chunk in stream:
                    if chunk.message is not None:
                        delta: dict[str, Any] = {}
                        if chunk.message.content:
                            parts.append(chunk.message.content)
                            delta["content"] = chunk.message.content
                        if chunk.message.tool_calls:
                            new = openai_tool_calls(chunk.message.tool_calls, first=len(calls))
                            delta["tool_calls"] = tools.deltas_for(new, first_index=len(calls))
                            calls += new
                        if delta:
                            request.emit(delta)
                    if chunk.done:
                        final = chunk
                    # Closing the stream (on the way out) tells Ollama to stop generating.
                    request.check_canceled()
                    if not chunk.done and time.monotonic() > deadline:
                        raise BackendError(f"Timed out after {timeout_s:g}s (streaming).", retryable=True)
        except ollama.ResponseError as exc:
            raise classify_response_error(exc) from None
        except httpx.TimeoutException:
            raise BackendError(f"Timed out after {timeout_s:g}s.", retryable=True) from None
        except (httpx.TransportError, ConnectionError) as exc:
            raise BackendError(f"Connection failed: {transport_summary(exc)}", retryable=True) from None
        except (json.JSONDecodeError, pydantic.ValidationError) as exc:
            # Not Ollama's protocol (a proxy's error page, a cut line): the server side is broken, try again.
            raise BackendError(f"Malformed stream from the server: {type(exc).__name__}", retryable=True) from None

        if final is None:
            raise BackendError("The stream ended without 'done': the answer is truncated.", retryable=True)
        finish_reason = final.done_reason or "stop"
        if calls and finish_reason != "length":
            finish_reason = "tool_calls"
        return GenerationResult(
            output="".join(parts),
            tool_calls=calls,
            prompt_tokens=final.prompt_eval_count or 0,
            completion_tokens=final.eval_count or 0,
            finish_reason=finish_reason,
            latency_ms=int((time.monotonic() - started) * 1000),
            timings={
                k: v / 1e6  # Ollama reports nanoseconds
                for k in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
                if (v := getattr(final, k, None)) is not None
            },
        )


def build_chat_kwargs(backend: BackendConfig, request: GenerationRequest, model: str) -> dict[str, Any]:
    """The ``Client.chat`` arguments for a job (see the module docstring for the merge order)."""
    options: dict[str, Any] = dict(backend.config.get("options") or {})
    fields: dict[str, Any] = {}
    for name, value in request.params.items():
        if name in REQUEST_FIELDS:
            fields[name] = value
        elif name == "options" and isinstance(value, dict):
            options.update(value)
        else:
            options[OPTION_ALIASES.get(name, name)] = value
    if request.max_tokens is not None:
        options["num_predict"] = request.max_tokens
    if request.temperature is not None:
        options["temperature"] = request.temperature
    for name in ("stop", "top_p", "seed"):
        if getattr(request, name) is not None:
            options[name] = getattr(request, name)
    token_params.clamp(options, *token_params.caps())
    fmt = ollama_format(request.response_format)
    if fmt is not None:
        fields["format"] = fmt
    chosen = chosen_tools(request.tools, request.tool_choice)
    if chosen:
        fields["tools"] = chosen

    kwargs: dict[str, Any] = {"model": model, "messages": build_messages(request), **fields}
    if options:
        kwargs["options"] = options
    keep_alive = backend.config.get("keep_alive")
    if keep_alive is not None:
        kwargs["keep_alive"] = keep_alive
    return kwargs


def build_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    """The job's messages in Ollama's shape (module docstring), with its images on the last user
    message (a new one if there is none)."""
    messages: list[dict[str, Any]] = []
    conversation = [dict(m) for m in request.messages]
    for m in conversation:  # copies: placing the images must not change the request
        if isinstance(m.get("content"), list):
            m["content"] = [dict(p) if isinstance(p, dict) else p for p in m["content"]]
    loose = image_refs.place(conversation, request.images, lambda b64: "data:;base64," + b64)
    names: dict[str, str] = {}  # tool_call_id -> function name, from the assistant messages so far
    for m in conversation:
        out: dict[str, Any] = {"role": m.get("role", "user")}
        content = m.get("content", "")
        if isinstance(content, list):
            out["content"] = " ".join(
                str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
            images = [_part_image(p) for p in content if isinstance(p, dict) and p.get("type") == "image_url"]
            if images:
                out["images"] = images
        else:
            out["content"] = "" if content is None else content
        if isinstance(m.get("tool_calls"), list):
            out["tool_calls"] = []
            for call in tools.normalize(m["tool_calls"]):
                names[call["id"]] = call["function"]["name"]
                out["tool_calls"].append(
                    {"function": {"name": call["function"]["name"], "arguments": _arguments(call)}}
                )
        tool_name = m.get("name") or names.get(str(m.get("tool_call_id") or ""))
        if out["role"] == "tool" and tool_name:
            out["tool_name"] = tool_name
        messages.append(out)
    if loose:
        images = [_decode(img) for img in loose]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if users:
            messages[users[-1]]["images"] = [*messages[users[-1]].get("images", ()), *images]
        else:
            messages.append({"role": "user", "content": "", "images": images})
    return messages


def _decode(image_b64: str) -> bytes:
    # Decoded here and handed over as bytes: the client treats a *string* that names an existing
    # file as a path and would upload that file, so user data never reaches it as a str.
    try:
        return base64.b64decode(image_b64, validate=True)
    except (binascii.Error, ValueError):
        raise BackendError("An image is not valid base64.", retryable=False) from None


def _part_image(part: dict[str, Any]) -> bytes:
    """An ``image_url`` content part's image: Ollama takes no URLs, only a data URL's bytes."""
    url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
    if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
        raise BackendError("Ollama takes images only as base64 data URLs.", retryable=False)
    return _decode(url.partition(",")[2])


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI call's JSON-text arguments as the object Ollama wants."""
    try:
        value = json.loads(call["function"]["arguments"] or "{}")
    except ValueError:
        raise BackendError(f"Tool call {call['id']}: arguments are not valid JSON.", retryable=False) from None
    if not isinstance(value, dict):
        raise BackendError(f"Tool call {call['id']}: arguments must be a JSON object.", retryable=False)
    return value


def ollama_format(response_format: dict[str, Any] | None) -> str | dict[str, Any] | None:
    """OpenAI's ``response_format`` as Ollama's ``format``: "json", a JSON schema, or None (plain text)."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else "json"
    return None


def chosen_tools(tool_list: list[dict[str, Any]] | None, tool_choice: Any) -> list[dict[str, Any]]:
    """The tools to offer Ollama, which has no ``tool_choice``: "none" offers none, a named function only it."""
    if not tool_list or tool_choice == "none":
        return []
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        named = [t for t in tool_list if isinstance(t, dict) and (t.get("function") or {}).get("name") == name]
        return named or tool_list
    return list(tool_list)


def openai_tool_calls(calls: Any, *, first: int = 0) -> list[dict[str, Any]]:
    """Ollama's tool calls (arguments an object, no id) in OpenAI's shape, ids ``call_<n>`` from ``first``."""
    return [
        tools.finished(f"call_{first + i}", call.function.name, dict(call.function.arguments or {}))
        for i, call in enumerate(calls)
    ]


def classify_response_error(exc: ollama.ResponseError) -> BackendError:
    """Ollama's HTTP status decides; an ``{"error"}`` line inside a 200 stream (status -1) is retryable."""
    if exc.status_code is not None and 300 <= exc.status_code < 400:  # the body is not Ollama's: not repeated
        return BackendError(
            f"HTTP {exc.status_code} redirect not followed: set the backend's base URL to the server itself.",
            retryable=False,
        )
    message = str(exc.error) or "Ollama returned an error."
    if exc.status_code is None or exc.status_code < 100:
        # The server failed after it began answering (runner crash, out of memory): another try may pass.
        return BackendError(f"Error during generation: {message}", retryable=True)
    return BackendError.from_status(exc.status_code, message)


def _first_error(exc: Exception) -> str:
    if isinstance(exc, pydantic.ValidationError) and exc.errors():
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc)
