"""Two servers for outbound-request tests: one that redirects every request, and the "internal service"
it points at, which answers anything with a secret (what an SSRF through a redirect would read back).

``RedirectFake(location)`` answers every request with ``status`` (302 by default), ``Location:
<location><path>`` and a small HTML body holding :data:`REDIRECT_BODY`; ``InternalServiceFake``
answers every request with ``status`` (200 by default) and a JSON body in which every field a probe
reads (``version``, ``models``, ``data``, ``error``) holds :data:`INTERNAL_SECRET`.
"""

from __future__ import annotations

from typing import Any

from tests.fakes import FakeHandler, FakeServer, RecordedRequest

INTERNAL_SECRET = "INTERNAL-ONLY-aws-credentials-0xDEADBEEF"
REDIRECT_BODY = "REDIRECT-BODY-moved-elsewhere"


class RedirectFake(FakeServer):
    def __init__(self, location: str, *, status: int = 302, **knobs: Any) -> None:
        super().__init__(**knobs)
        self.location = location.rstrip("/")
        self.status = status

    def handle(self, h: FakeHandler, req: RecordedRequest) -> None:
        body = f"<html><body>{REDIRECT_BODY}</body></html>".encode()
        h.send_bytes(self.status, body, "text/html", {"Location": f"{self.location}{req.path}"})


class InternalServiceFake(FakeServer):
    def __init__(self, *, status: int = 200, **knobs: Any) -> None:
        super().__init__(**knobs)
        self.status = status

    def handle(self, h: FakeHandler, req: RecordedRequest) -> None:
        secret = INTERNAL_SECRET
        h.send_json(
            self.status,
            {
                "version": secret,
                "models": [{"name": secret}],
                "data": [{"id": secret}],
                "error": {"message": secret},
                "capabilities": [secret],
            },
        )
