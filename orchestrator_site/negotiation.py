"""Content negotiation for views that answer a type DRF has no renderer for.

A relayed event stream (``text/event-stream``) or a file's bytes are written by the view (or the
relay), not by a renderer, so DRF's negotiation would refuse an ``Accept`` that asks for them with a
406. :class:`AlsoAnswers` lets such an ``Accept`` through (errors are still JSON) and keeps the 406
for any other type no renderer answers.
"""

from __future__ import annotations

from typing import Any

from rest_framework.request import Request


def accepted_types(accept: str) -> set[str]:
    """The media types an ``Accept`` header names, without their parameters (``q=``...)."""
    return {part.split(";", 1)[0].strip().lower() for part in accept.split(",") if part.strip()}


class AlsoAnswers:
    """For an ``APIView``: an ``Accept`` naming one of ``also_answers`` is not a 406."""

    also_answers: tuple[str, ...] = ()

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        force = force or bool(accepted_types(request.META.get("HTTP_ACCEPT", "")) & set(self.also_answers))
        return super().perform_content_negotiation(request, force=force)  # type: ignore[misc]
