"""The live server that tests/test_client.py and tests/test_cli.py talk to (real gunicorn + uvicorn workers,
a real RQ worker, Redis and the test database), and an httpx transport that records (and can break) calls."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from rest_framework.authtoken.models import Token

from routing import policies
from routing.models import Backend, BackendKind, RoutingPolicy

WORD_MS = 60  # the dev backend sends one word every WORD_MS ms


def start(gunicorn_server, worker_process, user) -> dict:
    """Backends ``dev`` (echoes the prompt, a word every 60 ms) and ``broken`` (every job fails), one web
    tier of 2 processes and one worker; returns the base URL and a token of ``user``."""
    Backend.objects.create(
        name="dev", kind=BackendKind.DEV, model="echo", config={"latency_ms": 0, "token_ms": WORD_MS}
    )
    Backend.objects.create(name="broken", kind=BackendKind.DEV, config={"fail_rate": 1.0, "fail_status": 400})
    policies.activate(RoutingPolicy.objects.create(name="default", strategy="ordered", params={"order": ["dev"]}))
    base = gunicorn_server(workers=2)
    worker_process()
    return {"base": base, "token": Token.objects.create(user=user).key}


def slow_prompt(seconds: float) -> str:
    """A prompt the dev backend takes about ``seconds`` to echo."""
    return " ".join(["w"] * int(seconds * 1000 / WORD_MS))


class Recorder(httpx.HTTPTransport):
    """A real transport that notes every request (time, method, path, query, headers); ``fail`` may replace
    an answer with a transport error *after* the server handled the request, as a dropped connection does."""

    def __init__(
        self,
        fail: Callable[[httpx.Request, httpx.Response], bool] | None = None,
        break_first_stream_after: int | None = None,
    ) -> None:
        super().__init__()
        self.calls: list[dict] = []
        self.fail = fail
        self.break_after = break_first_stream_after

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(
            {
                "at": time.monotonic(),
                "method": request.method,
                "path": request.url.path,
                "query": dict(request.url.params),
                "headers": dict(request.headers),
            }
        )
        response = super().handle_request(request)
        if self.fail and self.fail(request, response):
            response.read()
            response.close()
            raise httpx.ReadError("connection reset by the test after the server answered", request=request)
        if self.break_after is not None and response.headers.get("content-type", "").startswith("text/event-stream"):
            events, self.break_after = self.break_after, None
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_BreakingStream(response.stream, events, request),
                extensions=response.extensions,
            )
        return response

    def to(self, method: str, path: str) -> list[dict]:
        return [c for c in self.calls if c["method"] == method and c["path"] == path]


class _BreakingStream(httpx.SyncByteStream):
    """A response body that breaks (``httpx.ReadError``) once ``events`` whole SSE events went through."""

    def __init__(self, inner, events: int, request: httpx.Request) -> None:
        self.inner, self.events, self.request = inner, events, request

    def __iter__(self):
        seen = 0
        for chunk in self.inner:
            yield chunk
            seen += chunk.count(b"\n\n")
            if seen >= self.events:
                raise httpx.ReadError("the stream broke (test)", request=self.request)

    def close(self) -> None:
        self.inner.close()
