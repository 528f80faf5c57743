"""Structured output: the check a job's ``response_format`` puts on its final output.

OpenAI's two structured kinds, enforced here whatever the backend did with them (a server may ignore
``response_format``, and Ollama's ``format`` only guides sampling):

- ``{"type": "json_object"}``: the output must parse as a JSON object;
- ``{"type": "json_schema", "json_schema": {"schema": {...}, "strict": true}}``: the output must also
  be valid against the schema (``jsonschema``, the draft the schema's ``$schema`` names, else 2020-12).
  Without ``strict`` the schema only guides the backend, as at OpenAI.

A violation is the request's fault, not the backend's: a permanent ``BackendError`` naming where
and why (retrying the same request would most likely fail the same way, and a schema that cannot be
met must not spend a retry budget). An answer that called tools has no content to check.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from workers.backends.base import BackendError, GenerationResult


def check(response_format: dict[str, Any] | None, result: GenerationResult) -> None:
    """Raise a permanent ``BackendError`` when ``result`` breaks ``response_format``; else return."""
    if not isinstance(response_format, dict) or result.tool_calls:
        return
    kind = response_format.get("type")
    if kind not in ("json_object", "json_schema"):
        return  # "text", or a kind we do not check
    try:
        value = json.loads(result.output)
    except ValueError as exc:
        raise _violation(f"the output is not valid JSON ({exc})", result) from None
    if kind == "json_object":
        if not isinstance(value, dict):
            raise _violation(f"the output is JSON but not an object (a {_json_type(value)})", result)
        return
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or spec.get("strict") is not True:
        return
    schema = spec.get("schema")
    if not isinstance(schema, dict | bool):
        raise BackendError("response_format.json_schema.schema is missing or not an object", retryable=False)
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as exc:
        msg = f"response_format.json_schema.schema is not a valid schema: {exc.message}"
        raise BackendError(msg, retryable=False) from None
    error = best_match(validator_class(schema).iter_errors(value))
    if error is not None:
        raise _violation(f"schema violation at {error.json_path}: {error.message}", result)


def _violation(what: str, result: GenerationResult) -> BackendError:
    reason = " (the answer was cut at the token limit)" if result.finish_reason == "length" else ""
    return BackendError(f"Structured output check failed: {what}{reason}", retryable=False)


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
