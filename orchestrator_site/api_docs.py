"""The API's documentation pages: Swagger UI at ``/api/docs``, Redoc at ``/api/redoc``.

Both are served from our own static files (``drf-spectacular-sidecar``), never a CDN, so they work
offline and leak no visit to a third party. Each page carries its own Content-Security-Policy: scripts
only from this site and no inline script (Swagger UI's start-up script is fetched from
``/api/docs?script``, drf-spectacular's split view), styles inline as both UIs set them at run time,
nothing framed or posted elsewhere. The header is set here, on these pages only.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.views import SpectacularRedocView, SpectacularSwaggerSplitView
from rest_framework.request import Request
from rest_framework.response import Response

DOCS_CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",  # both UIs write style attributes and <style> elements
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",  # the schema, and Swagger UI's "Try it out"
        "worker-src 'self' blob:",  # Redoc's search runs in a worker made from a blob
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'none'",
    ]
)


class _OwnCSP:
    def finalize_response(self, request: Request, response: Response, *args: Any, **kwargs: Any) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[misc]
        response.headers["Content-Security-Policy"] = DOCS_CSP
        return response


class SwaggerUI(_OwnCSP, SpectacularSwaggerSplitView):
    """Swagger UI over ``/api/schema``; its start-up script is a file, not inline."""


class Redoc(_OwnCSP, SpectacularRedocView):
    """Redoc over ``/api/schema`` (templates/drf_spectacular/redoc.html: no web fonts from Google)."""
