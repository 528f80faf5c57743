"""Two servers for outbound-request tests: one that redirects every request, and the "internal service"
it points at, which answers anything with a secret (what an SSRF through a redirect would read back).

``RedirectFake(location)`` answers every request with ``status`` (302 by default), ``Location:
<location><path>`` and a small HTML body holding :data:`REDIRECT_BODY`; ``InternalServiceFake``
answers every request with ``status`` (200 by default) and a JSON body in which every field a probe
reads (``version``, ``models``, ``data``, ``error``) holds :data:`INTERNAL_SECRET`. ``BannerServer`` is
a service that does not speak HTTP (SSH, Redis): it answers any connection with a line holding
:data:`BANNER_SECRET`, which an HTTP library's protocol error would quote.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, Self

from tests.fakes import FakeHandler, FakeServer, RecordedRequest

INTERNAL_SECRET = "INTERNAL-ONLY-aws-credentials-0xDEADBEEF"
REDIRECT_BODY = "REDIRECT-BODY-moved-elsewhere"
BANNER_SECRET = "SSH-2.0-OpenSSH_internal-BANNER"


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


class BannerServer:
    """A raw TCP server that sends :data:`BANNER_SECRET` and a blank line to whoever connects."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="BannerServer")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(f"{BANNER_SECRET}\r\n\r\n".encode())
                conn.settimeout(1)
                conn.recv(65536)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
