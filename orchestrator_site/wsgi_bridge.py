"""Django's WSGI application under the ASGI server, with one thread hand-off per request.

A generic ASGI→WSGI adapter (``a2wsgi``, asgiref) crosses between the event loop and the request's
thread for every read of the body and every message sent: a ``POST /jobs`` crossed five times, each a
wake-up of the loop and a blocked thread, and the web tier served fewer requests than sync gunicorn
workers did (docs/performance.md, "The web tier"). Here the loop reads the whole body first (spooled to
a temporary file past ``SPOOL_BYTES``, refused with a 413 past ``max_body``), one executor call runs
Django and collects its response, and the loop sends it: one crossing. A response longer than
``COLLECT_BYTES`` (a file download, a ``StreamingHttpResponse``) is sent from its thread chunk by
chunk instead, so its iteration keeps the thread (and the database connection) it started on.

Reading the body before Django sees the request also means a client that goes before its body is in
never reaches Django, where a partial body used to surface as a misleading 400.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
WsgiApp = Callable[[dict[str, Any], Callable], Iterable[bytes]]

SPOOL_BYTES = 1024 * 1024
COLLECT_BYTES = 256 * 1024
_SENT = object()  # the response went out from its thread


class TooLarge(Exception):
    pass


class WsgiBridge:
    """ASGI application running a WSGI ``app`` in a pool of ``threads`` threads."""

    def __init__(self, app: WsgiApp, *, threads: int, max_body: int) -> None:
        self.app = app
        self.max_body = max_body
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")
        self.script_name = os.environ.get("SCRIPT_NAME", "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1000})
            return
        try:
            body = await self._read_body(receive)
        except TooLarge:
            await _send_413(send, self.max_body, openai=scope["path"].startswith("/v1/"))
            return
        if body is None:
            return  # the client went before its request was in: nobody to answer
        environ = self._environ(scope, body)
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        try:
            answer = await loop.run_in_executor(self.executor, context.run, self._run, environ, loop, send)
        finally:
            body.close()
        if answer is _SENT:
            return
        start, payload = answer
        await send(start)
        await send({"type": "http.response.body", "body": payload})

    async def _read_body(self, receive: Receive) -> IO[bytes] | None:
        chunks: list[bytes] = []
        size = 0
        spool: IO[bytes] | None = None
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if spool is not None:
                    spool.close()
                return None
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body:
                    if spool is not None:
                        spool.close()
                    raise TooLarge
                if spool is not None:
                    spool.write(chunk)
                elif size > SPOOL_BYTES:
                    spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the caller, after Django)
                    spool.write(b"".join(chunks))
                    spool.write(chunk)
                    chunks = []
                else:
                    chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if spool is None:
            return io.BytesIO(b"".join(chunks))
        spool.seek(0)
        return spool

    def _environ(self, scope: Scope, body: IO[bytes]) -> dict[str, Any]:
        script_name = scope.get("root_path", "").encode("utf8").decode("latin1")
        path_info = scope["path"].encode("utf8").decode("latin1")
        if script_name and path_info.startswith(script_name):
            path_info = path_info[len(script_name) :]
        if self.script_name:
            script_name = self.script_name
        server_name, server_port = scope.get("server") or ("localhost", 80)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": scope["method"],
            "SCRIPT_NAME": script_name,
            "PATH_INFO": path_info,
            "QUERY_STRING": scope["query_string"].decode("latin1"),
            "SERVER_NAME": server_name,
            "SERVER_PORT": str(server_port or 0),
            "SERVER_PROTOCOL": f"HTTP/{scope['http_version']}",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": scope.get("scheme", "http"),
            "wsgi.input": body,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
        }
        client = scope.get("client")
        if client:
            environ["REMOTE_ADDR"], port = client
            environ["REMOTE_PORT"] = str(port)
        for raw_name, raw_value in scope.get("headers", ()):
            name = raw_name.decode("latin1")
            if name == "content-length":
                key = "CONTENT_LENGTH"
            elif name == "content-type":
                key = "CONTENT_TYPE"
            else:
                key = "HTTP_" + name.upper().replace("-", "_")
            value = raw_value.decode("latin1")
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        # A chunked body has no Content-Length; Django reads only as many bytes as it says.
        environ["CONTENT_LENGTH"] = str(body.seek(0, io.SEEK_END))
        body.seek(0)
        return environ

    def _run(
        self, environ: dict[str, Any], loop: asyncio.AbstractEventLoop, send: Send
    ) -> tuple[dict[str, Any], bytes] | object:
        """In a pool thread: run the application; return its response, or send a long one from here."""
        started: list[Any] = []
        written: list[bytes] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
            started[:] = [status, headers]  # nothing is sent before the application returns: replaceable
            return written.append

        result = self.app(environ, start_response)
        try:
            chunks, size = written, sum(map(len, written))
            iterator = iter(result)
            for chunk in iterator:
                chunks.append(chunk)
                size += len(chunk)
                if size > COLLECT_BYTES:
                    self._send_rest(loop, send, _start_message(*started), chunks, iterator)
                    return _SENT
            return _start_message(*started), b"".join(chunks)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()  # Django's request_finished: closes this thread's stale database connections

    @staticmethod
    def _send_rest(
        loop: asyncio.AbstractEventLoop,
        send: Send,
        start: dict[str, Any],
        chunks: list[bytes],
        iterator: Iterable[bytes],
    ) -> None:
        def out(message: dict[str, Any]) -> None:
            asyncio.run_coroutine_threadsafe(send(message), loop).result()

        out(start)
        out({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})
        for chunk in iterator:
            if chunk:
                out({"type": "http.response.body", "body": chunk, "more_body": True})
        out({"type": "http.response.body", "body": b""})


def _start_message(status: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "type": "http.response.start",
        "status": int(status.split(" ", 1)[0]),
        "headers": [(name.lower().encode("latin1"), value.encode("latin1")) for name, value in headers],
    }


async def _send_413(send: Send, limit: int, *, openai: bool) -> None:
    message = f"The request body is larger than {limit} bytes (REQUEST_BODY_MAX_BYTES)."
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": "request_too_large"}
    body = json.dumps({"error": error} if openai else {"detail": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
