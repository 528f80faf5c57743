"""The ASGI→WSGI bridge (orchestrator_site.wsgi_bridge): bodies, limits, long responses, disconnects."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import Any

from orchestrator_site.wsgi_bridge import COLLECT_BYTES, SPOOL_BYTES, WsgiBridge


def echo_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Answers the body's length, its SHA-256, the input's type and the thread it ran on."""
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("201 Created", [("Content-Type", "text/plain"), ("X-Path", environ["PATH_INFO"])])
    info = f"{len(body)} {hashlib.sha256(body).hexdigest()} {type(environ['wsgi.input']).__name__}"
    return [info.encode(), f" {threading.get_ident()}".encode()]


class LongResponse:
    """A streamed response that notes the threads it was iterated and closed on."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.threads: set[int] = set()
        self.closed = False

    def __call__(self, environ: dict[str, Any], start_response: Any) -> LongResponse:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return self

    def __iter__(self):
        for i in range(self.chunks):
            self.threads.add(threading.get_ident())
            yield bytes([i % 256]) * 64 * 1024

    def close(self) -> None:
        self.threads.add(threading.get_ident())
        self.closed = True


def scope(path: str = "/jobs", headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "headers": headers or [],
    }


def call(app: WsgiBridge, chunks: list[bytes], *, disconnect: bool = False, path: str = "/jobs") -> list[dict]:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    if disconnect:
        messages = messages[:-1] + [{"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope(path), receive, send))
    return sent


def body_of(sent: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_chunked_body_reaches_the_app_whole_without_a_content_length():
    app = WsgiBridge(echo_app, threads=2, max_body=10 * SPOOL_BYTES)
    chunks = [b"a" * 1000, b"b" * 2000, b"c"]
    sent = call(app, chunks)
    assert sent[0]["status"] == 201
    assert (b"x-path", b"/jobs") in sent[0]["headers"]
    length, digest, kind, _ = body_of(sent).split()
    assert int(length) == 3001 and digest.decode() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert kind == b"BytesIO"
    assert len([m for m in sent if m["type"] == "http.response.body"]) == 1  # one message: one hand-off


def test_a_large_body_is_spooled_to_a_file_and_arrives_intact():
    app = WsgiBridge(echo_app, threads=2, max_body=10 * SPOOL_BYTES)
    chunks = [bytes([i]) * 256 * 1024 for i in range(6)]  # 1.5 MiB
    length, digest, kind, _ = body_of(call(app, chunks)).split()
    assert int(length) == 6 * 256 * 1024
    assert digest.decode() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert kind != b"BytesIO"  # a temporary file, not memory


def test_a_body_over_the_limit_is_a_413_before_the_app_runs():
    ran = []

    def app(environ, start_response):  # pragma: no cover - must not run
        ran.append(1)
        return []

    bridge = WsgiBridge(app, threads=1, max_body=4096)
    sent = call(bridge, [b"x" * 3000, b"x" * 3000])
    assert sent[0]["status"] == 413 and not ran
    assert b"4096" in body_of(sent) and b"REQUEST_BODY_MAX_BYTES" in body_of(sent)
    openai = call(bridge, [b"x" * 5000], path="/v1/files")
    assert b'"code": "request_too_large"' in body_of(openai)  # the /v1 error shape


def test_a_client_gone_before_its_body_is_in_never_reaches_the_app():
    ran = []

    def app(environ, start_response):  # pragma: no cover - must not run
        ran.append(1)
        return []

    assert call(WsgiBridge(app, threads=1, max_body=1 << 20), [b"{", b"}"], disconnect=True) == []
    assert not ran


def test_a_long_response_is_streamed_from_the_thread_that_started_it():
    long = LongResponse(chunks=2 * COLLECT_BYTES // (64 * 1024) + 3)
    sent = call(WsgiBridge(long, threads=4, max_body=1 << 20), [b""])
    assert sent[0]["status"] == 200
    assert len(body_of(sent)) == long.chunks * 64 * 1024
    assert sent[-1] == {"type": "http.response.body", "body": b""}  # the end
    assert len(long.threads) == 1 and long.closed  # iterated and closed on one thread (its DB connection)
