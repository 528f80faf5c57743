"""Images placed inside a conversation: content parts that point at the job's stored images.

``POST /v1/chat/completions`` keeps where each image stood in its message: the job stores the images
(``jobs.image_store``) and the content part keeps ``{"type": "image_url", "image_url": {"url":
"job-image:<n>"}}``. An adapter puts image ``n`` back there in its backend's form; images no part
points at (``POST /jobs`` with ``images``) go on the last user message, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workers.backends.base import BackendError

PREFIX = "job-image:"


def ref(index: int) -> str:
    return f"{PREFIX}{index}"


def place(messages: list[dict[str, Any]], images: list[str], url_of: Callable[[str], str]) -> list[str]:
    """Replace every ``job-image:<n>`` URL in ``messages`` (in place) by ``url_of(images[n])``.

    Returns the images no part referred to. A reference past the stored images is a permanent error.
    """
    used: set[int] = set()
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for i, part in enumerate(content):
            image = part.get("image_url") if isinstance(part, dict) else None
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str) or not url.startswith(PREFIX):
                continue
            index = url[len(PREFIX) :]
            if not index.isdigit() or int(index) >= len(images):
                raise BackendError(f"Content part refers to {url}, which the job does not have.", retryable=False)
            used.add(int(index))
            content[i] = {**part, "image_url": {**image, "url": url_of(images[int(index)])}}
    return [img for n, img in enumerate(images) if n not in used]
