"""OpenAI Chat Completions requests into job submissions, and jobs back into OpenAI's objects.

Pure functions: no ORM, no Redis. The request is checked field by field so that a 400 names the
``param`` as OpenAI's does; the job keeps the conversation in OpenAI's own message shape (content
parts, ``tool_calls``, ``tool_call_id``), except images, which go to the job's image store and are
replaced in the content by ``{"type": "image_url", "image_url": {"url": "job-image:<n>"}}`` so the
adapters put each image back where it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from workers.backends import image_refs

ROLES = ("system", "developer", "user", "assistant", "tool")
PRIORITIES = ("high", "normal", "low")
AUTO = "auto"
# Accepted and passed to the backend as they are (OpenAI-compatible servers know them).
PASSTHROUGH = ("top_p", "stop", "seed", "frequency_penalty", "presence_penalty", "logit_bias", "parallel_tool_calls")
# Accepted and not used (documented in docs/openai.md).
IGNORED = ("user", "store", "service_tier", "logprobs", "top_logprobs", "prediction", "modalities", "reasoning_effort")
KNOWN = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "tools",
    "tool_choice",
    "response_format",
    "metadata",
    "priority",
    "n",
    "timeout_s",
    "queue_timeout_s",
    *PASSTHROUGH,
    *IGNORED,
}


class InvalidRequest(Exception):
    """A 400 in OpenAI's shape, naming the offending ``param``."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass
class ChatRequest:
    """A checked request: what to submit (``job``) and how to answer (the rest)."""

    model: str
    job: dict[str, Any]
    images: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse(body: Any, *, priority_header: str | None, limits: dict[str, int]) -> ChatRequest:
    """Check a ``POST /v1/chat/completions`` body and build the job submission from it."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' is required: a model name, a backend name, or 'auto'.", "model")
    if body.get("n", 1) != 1:
        raise InvalidRequest("Only n=1 is supported.", "n")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise InvalidRequest("'stream_options' is an object, allowed only with stream=true.", "stream_options")
    include_usage = bool(options and _bool(options, "include_usage", "stream_options.include_usage"))

    messages, images = _messages(body.get("messages"), limits)
    job: dict[str, Any] = {"messages": messages, "priority": _priority(body, priority_header)}
    if images:
        job["images"] = images
    tokens = _max_tokens(body, limits)
    if tokens is not None:
        job["max_tokens"] = tokens
    if body.get("temperature") is not None:
        job["temperature"] = _number(body, "temperature", 0.0, 2.0)
    params: dict[str, Any] = {}
    for name in PASSTHROUGH:
        if body.get(name) is not None:
            params[name] = _passthrough(name, body[name])
    if body.get("tools") is not None:
        params["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        params["tool_choice"] = _tool_choice(body["tool_choice"], params.get("tools"))
    if body.get("response_format") is not None:
        params["response_format"] = _response_format(body["response_format"])
    if params:
        job["params"] = params
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise InvalidRequest("'metadata' is an object of strings.", "metadata")
        job["metadata"] = metadata
    for name in ("timeout_s", "queue_timeout_s"):
        if body.get(name) is not None:
            job[name] = _integer(body, name, 1, None)
    if model != AUTO:
        job["model"] = model  # the view turns a backend name into a pin
    return ChatRequest(model=model, job=job, images=images, stream=stream, include_usage=include_usage)


def _bool(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{param or name}' must be a boolean.", param or name)
    return value


def _number(body: dict, name: str, low: float, high: float) -> float:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be a number from {low:g} to {high:g}.", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None) -> int:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise InvalidRequest(f"'{name}' must be an integer {bound}.", name)
    return value


def _priority(body: dict, header: str | None) -> str:
    value = body.get("priority", header or "normal")
    if value not in PRIORITIES:
        raise InvalidRequest(f"'priority' (or X-Priority) must be one of: {', '.join(PRIORITIES)}.", "priority")
    return value


def _max_tokens(body: dict, limits: dict[str, int]) -> int | None:
    found = None
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            value = _integer(body, name, 1, limits["max_tokens"])
            found = value if found is None else min(found, value)
    return found


def _messages(raw: Any, limits: dict[str, int]) -> tuple[list[dict[str, Any]], list[str]]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty array.", "messages")
    if len(raw) > limits["messages"]:
        raise InvalidRequest(f"At most {limits['messages']} messages are allowed.", "messages")
    messages, images, chars = [], [], 0
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{where}' must be an object.", where)
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"'{where}.role' must be one of: {', '.join(ROLES)}.", f"{where}.role")
        out: dict[str, Any] = {"role": "system" if role == "developer" else role}
        content = message.get("content")
        if isinstance(content, str):
            out["content"] = content
            chars += len(content)
        elif isinstance(content, list):
            out["content"], used = _parts(content, where, images, limits)
            chars += used
        elif content is None and (role == "assistant" and message.get("tool_calls")):
            out["content"] = None
        else:
            raise InvalidRequest(f"'{where}.content' must be a string or an array of content parts.", where)
        if role == "assistant" and message.get("tool_calls") is not None:
            out["tool_calls"] = _assistant_tool_calls(message["tool_calls"], where)
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(f"'{where}.tool_call_id' is required for tool messages.", f"{where}.tool_call_id")
            out["tool_call_id"] = call_id
        if isinstance(message.get("name"), str):
            out["name"] = message["name"]
        extra = set(message) - {"role", "content", "tool_calls", "tool_call_id", "name", "refusal"}
        if extra:
            name = sorted(extra)[0]
            raise InvalidRequest(f"Unknown field '{where}.{name}'.", f"{where}.{name}")
        messages.append(out)
    if chars > limits["prompt_chars"]:
        raise InvalidRequest(f"Messages hold {chars} characters; the limit is {limits['prompt_chars']}.", "messages")
    if len(images) > limits["images"]:
        raise InvalidRequest(f"At most {limits['images']} images are allowed.", "messages")
    return messages, images


def _parts(parts: list, where: str, images: list[str], limits: dict[str, int]) -> tuple[list[dict], int]:
    out, chars = [], 0
    for j, part in enumerate(parts):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
            chars += len(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            url = part["image_url"].get("url")
            if not isinstance(url, str) or not url.startswith("data:image/"):
                raise InvalidRequest(
                    f"'{at}.image_url.url' must be a data URL (data:image/...;base64,...): "
                    "this server does not fetch images.",
                    f"{at}.image_url.url",
                )
            detail = part["image_url"].get("detail")
            if detail is not None and detail not in ("auto", "low", "high"):
                raise InvalidRequest(f"'{at}.image_url.detail' must be auto, low or high.", f"{at}.image_url.detail")
            image = {"url": image_refs.ref(len(images)), **({"detail": detail} if detail else {})}
            out.append({"type": "image_url", "image_url": image})
            images.append(url)
        else:
            raise InvalidRequest(f"'{at}' must be a text or image_url content part.", at)
    return out, chars


def _assistant_tool_calls(calls: Any, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise InvalidRequest(f"'{where}.tool_calls' must be an array.", f"{where}.tool_calls")
    out = []
    for k, call in enumerate(calls):
        at = f"{where}.tool_calls[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str):
            raise InvalidRequest(f"'{at}' needs an id and a function with a name.", at)
        arguments = fn.get("arguments", "")
        if not isinstance(arguments, str):
            raise InvalidRequest(f"'{at}.function.arguments' must be a JSON string.", f"{at}.function.arguments")
        out.append({"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list) or not tools:
        raise InvalidRequest("'tools' must be a non-empty array.", "tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(f"'tools[{i}]' must be {{'type': 'function', 'function': {{'name': ...}}}}.", "tools")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise InvalidRequest(f"'tools[{i}].function.parameters' must be a JSON schema object.", "tools")
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, tools: list[dict] | None) -> Any:
    if choice in ("none", "auto", "required"):
        return choice
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest("'tool_choice' must be none, auto, required or a named function.", "tool_choice")
    if fn["name"] not in {t["function"]["name"] for t in tools or ()}:
        raise InvalidRequest(f"'tool_choice' names {fn['name']!r}, which is not in 'tools'.", "tool_choice")
    return {"type": "function", "function": {"name": fn["name"]}}


def _response_format(fmt: Any) -> dict:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict) or not spec.get("name"):
            raise InvalidRequest(
                "'response_format.json_schema' needs a name and a schema object.", "response_format.json_schema"
            )
        return {"type": "json_schema", "json_schema": spec}
    raise InvalidRequest("'response_format.type' must be text, json_object or json_schema.", "response_format")


def _passthrough(name: str, value: Any) -> Any:
    if name == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(s, str) for s in stops):
            raise InvalidRequest("'stop' must be a string or an array of up to 4 strings.", "stop")
        return value
    if name == "seed" and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequest("'seed' must be an integer.", "seed")
    if name == "top_p" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise InvalidRequest("'top_p' must be a number from 0 to 1.", "top_p")
    if name in ("frequency_penalty", "presence_penalty") and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2
    ):
        raise InvalidRequest(f"'{name}' must be a number from -2 to 2.", name)
    if name == "parallel_tool_calls" and not isinstance(value, bool):
        raise InvalidRequest("'parallel_tool_calls' must be a boolean.", name)
    if name == "logit_bias" and not isinstance(value, dict):
        raise InvalidRequest("'logit_bias' must be an object.", name)
    return value


# --- answers ----------------------------------------------------------------------------------


def completion_id(job_id: str) -> str:
    return "chatcmpl-" + job_id.replace("-", "")


def usage(doc: dict[str, Any]) -> dict[str, int]:
    raw = doc.get("usage") or {}
    prompt, completion = int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(doc: dict[str, Any]) -> str:
    if doc.get("tool_calls"):
        return "tool_calls"
    reason = doc.get("finish_reason") or "stop"
    return reason if reason in ("stop", "length", "tool_calls", "content_filter") else "stop"


def completion(doc: dict[str, Any], *, model: str, created: int) -> dict[str, Any]:
    """A finished job as a ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": doc.get("output") or None, "refusal": None}
    if doc.get("tool_calls"):
        message["tool_calls"] = doc["tool_calls"]
        message["content"] = doc.get("output") or None
    elif message["content"] is None:
        message["content"] = ""
    return {
        "id": completion_id(doc["id"]),
        "object": "chat.completion",
        "created": created,
        "model": doc.get("model") or model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(doc), "logprobs": None}],
        "usage": usage(doc),
        "system_fingerprint": doc.get("backend") or None,
    }


def chunk(
    job_id: str, *, model: str, created: int, delta: dict[str, Any] | None = None, finish: str | None = None
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` with no ``finish`` is the usage-only final chunk."""
    body: dict[str, Any] = {"id": completion_id(job_id), "object": "chat.completion.chunk", "created": created}
    body["model"] = model
    if delta is None and finish is None:
        body["choices"] = []
    else:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}]
    return body


def delta_of(event: dict[str, Any]) -> dict[str, Any] | None:
    """A delta event of the job's stream as an OpenAI chunk delta (None: nothing to send)."""
    out: dict[str, Any] = {}
    if isinstance(event.get("content"), str) and event["content"]:
        out["content"] = event["content"]
    if event.get("tool_calls"):
        out["tool_calls"] = event["tool_calls"]
    return out or None


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)
