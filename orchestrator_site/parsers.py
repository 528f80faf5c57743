"""The API's JSON parser: bounded nesting and finite numbers, checked before anything is built.

DRF's ``JSONParser`` hands the body to ``json.load``: about a thousand nested brackets reach
``RecursionError`` (a 500), and ``1e400``/``NaN``/``Infinity`` become floats that PostgreSQL and
SQLite's JSON columns refuse at insert time (an ``IntegrityError`` after the idempotency key was
claimed). This parser counts the nesting with a flat scan first, so no recursion happens on a
hostile body, then parses with hooks that turn every non-finite number into a 400 naming where it was.
Strings (keys too) holding ``\u0000`` or an unpaired surrogate escape are refused the same way:
PostgreSQL's text and jsonb cannot store them (a 500 at insert time).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

DEFAULT_MAX_DEPTH = 32

# One token of interest: a string (maybe a key, when a colon follows) or a bracket or comma. The string
# pattern is the unrolled loop, so a long base64 image is matched in one pass without backtracking.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"(\s*:)?|[\[\]{},]', re.DOTALL)
# The only ways a NUL or a lone surrogate gets into parsed JSON: their escapes (a cheap pre-check).
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class JSONBodyError(ParseError):
    """A body that is JSON but not acceptable: too deep, or a number that is not finite."""

    def __init__(self, message: str, path: list[str | int]) -> None:
        detail: dict[str, Any] = {"detail": message}
        if path and isinstance(path[0], str):
            detail[path[0]] = [message]
        super().__init__(detail)


def format_path(path: list[str | int]) -> str:
    """``["metadata", "a", 0]`` as ``metadata.a[0]`` (the body itself is ``(body)``)."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(body)"


def max_depth() -> int:
    return int(getattr(settings, "REQUEST_JSON_MAX_DEPTH", DEFAULT_MAX_DEPTH))


def check_depth(text: str, limit: int) -> None:
    """Raise :class:`JSONBodyError` naming the first place ``text`` nests deeper than ``limit``.

    A flat scan (no recursion): it tracks the key or index of every open container, so the error says
    where. Malformed JSON is not judged here; ``json.loads`` reports it afterwards.
    """
    # Each frame: [is_array, key or index of the child being read]
    stack: list[list[Any]] = []
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token[0] == '"':
            if match.group(1) and stack and not stack[-1][0]:
                try:
                    stack[-1][1] = json.loads(token[: match.start(1) - match.start()])
                except ValueError:
                    stack[-1][1] = "?"
        elif token in "[{":
            if len(stack) >= limit:
                path = [frame[1] for frame in stack if frame[1] is not None]
                where = format_path(path)
                raise JSONBodyError(f"JSON is nested deeper than {limit} levels at {where}.", path)
            stack.append([token == "[", 0 if token == "[" else None])
        elif token == ",":
            if stack and stack[-1][0]:
                stack[-1][1] += 1
        elif stack:
            stack.pop()


class _NonFinite:
    """Stands in for a number JSON can write but a database cannot store, until we know where it was."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _find_non_finite(value: Any, path: list[str | int]) -> tuple[list[str | int], str] | None:
    # Recursion is bounded: check_depth already capped the nesting.
    if isinstance(value, _NonFinite):
        return path, value.text
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, child in items:
        found = _find_non_finite(child, [*path, key])
        if found:
            return found
    return None


def _find_unstorable(value: Any, path: list[str | int]) -> list[str | int] | None:
    """The path of the first string (or key) with a NUL or an unpaired surrogate (bounded recursion)."""
    if isinstance(value, str):
        return path if _UNSTORABLE.search(value) else None
    if isinstance(value, dict):
        for key, child in value.items():
            if _UNSTORABLE.search(key):
                return [*path, key]
            found = _find_unstorable(child, [*path, key])
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found = _find_unstorable(child, [*path, index])
            if found is not None:
                return found
    return None


def loads(text: str, *, limit: int | None = None) -> Any:
    """``json.loads`` for request bodies: depth-checked first, non-finite numbers refused by path."""
    check_depth(text, max_depth() if limit is None else limit)
    seen: list[bool] = []

    def parse_float(literal: str) -> float | _NonFinite:
        number = float(literal)
        if math.isfinite(number):
            return number
        seen.append(True)
        return _NonFinite(literal)

    def parse_constant(literal: str) -> _NonFinite:
        seen.append(True)
        return _NonFinite(literal)

    data = json.loads(text, parse_float=parse_float, parse_constant=parse_constant)
    if seen:
        path, literal = _find_non_finite(data, []) or ([], "?")
        raise JSONBodyError(
            f"{format_path(path)}: {literal} is not a finite number; JSON numbers must be finite.", path
        )
    if _UNSTORABLE_ESCAPE.search(text):
        path = _find_unstorable(data, [])
        if path is not None:  # named with the characters escaped: the answer must be valid UTF-8 itself
            path = [_UNSTORABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", p) if isinstance(p, str) else p for p in path]
            raise JSONBodyError(
                f"{format_path(path)}: a NUL character (\\u0000) or an unpaired surrogate cannot be stored.", path
            )
    return data


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser with :func:`loads`: depth limit (``REQUEST_JSON_MAX_DEPTH``) and finite numbers."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        try:
            raw = stream.read() if stream is not None else b""
            text = raw.decode(encoding) if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        try:
            return loads(text)
        except JSONBodyError:
            raise
        except ValueError as exc:  # malformed JSON, or an integer with too many digits
            raise ParseError(f"JSON parse error - {exc}") from None
