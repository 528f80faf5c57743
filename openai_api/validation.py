"""A chat completion request checked as the job it becomes: by ``/v1/chat/completions`` and by each
line of a batch file (``batches.jsonl``), so both refuse the same things with the same words."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from jobs.api.serializers import Base64ImageField
from openai_api import translate
from workers.backends import params as token_params


def checked(
    body: Any, *, priority_header: str | None, limits: dict[str, Any]
) -> tuple[translate.ChatRequest, list[str]]:
    """The parsed request and its images (base64, checked); raises ``translate.InvalidRequest``."""
    chat = translate.parse(body, priority_header=priority_header, limits=limits)
    images = [_image(url, i) for i, url in enumerate(chat.images)]
    problems = token_params.problems(chat.job.get("params") or {}, *token_params.caps())
    if problems:
        path, message = next(iter(problems.items()))
        raise translate.InvalidRequest(f"{path}: {message}", path)
    return chat, images


def _image(url: str, index: int) -> str:
    try:
        return Base64ImageField().run_validation(url)
    except serializers.ValidationError as exc:
        detail = exc.detail[0] if isinstance(exc.detail, list) else exc.detail
        raise translate.InvalidRequest(f"Image {index}: {detail}", "messages") from None
