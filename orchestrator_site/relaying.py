"""Handing a request from Django to the event loop: the relay ticket.

Django serves every request in a thread (``orchestrator_site.asgi``). A view that would otherwise hold
its thread while a job runs (a streamed completion, ``GET /jobs/<id>/stream``, ``?wait=``) does all
its checks there (auth, validation, admission, visibility), then answers a *ticket*: a response
carrying ``TICKET_HEADER`` and a small JSON body saying what to relay. :class:`RelayMiddleware`,
outside Django, swallows that response and runs the relay named by its ``mode`` on the event loop,
where a waiting client costs a coroutine, not a thread. The header only ever comes from our own
views; a client cannot set a response header.

Under a plain WSGI server nothing would catch a ticket, so ``orchestrator_site.wsgi`` turns it into a
501 saying which server to run.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from django.http import HttpResponse, JsonResponse

log = logging.getLogger(__name__)

TICKET_HEADER = "X-Llmo-Relay"
_TICKET_HEADER_RAW = TICKET_HEADER.lower().encode()
HEARTBEAT_S = 15.0
CLEANUP_S = 1.0

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Relay = Callable[[dict[str, Any], Scope, Receive, Send], Awaitable[None]]


def ticket(mode: str, **fields: Any) -> HttpResponse:
    """The response a view returns to have ``mode``'s relay answer instead (see the module docstring)."""
    response = JsonResponse({"mode": mode, **fields})
    response[TICKET_HEADER] = mode
    return response


class RelayMiddleware:
    """ASGI middleware around the Django application: runs the relay a ticket asks for."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], relays: dict[str, Relay]) -> None:
        self.app = app
        self.relays = relays

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and any(
                name.lower() == _TICKET_HEADER_RAW for name, _ in message.get("headers", ())
            ):
                held["start"], held["body"] = message, b""
                return
            if "start" in held:
                held["body"] += message.get("body", b"")
                return
            await send(message)

        await self.app(scope, receive, capture)
        if "start" not in held:
            return
        order = json.loads(held["body"])
        await self.relays[order["mode"]](order, scope, receive, send)


class WsgiTicketGuard:
    """WSGI middleware: a ticket reached a WSGI server, which cannot relay; say so (501)."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Any:
        replaced = False

        def guarded(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal replaced
            if any(name.lower() == TICKET_HEADER.lower() for name, _ in headers):
                replaced = True
                return start_response("501 Not Implemented", [("Content-Type", "application/json")], exc_info)
            return start_response(status, headers, exc_info)

        result = self.app(environ, guarded)
        if not replaced:
            return result
        if hasattr(result, "close"):
            result.close()
        detail = (
            "This endpoint streams or waits, which needs the ASGI server: "
            "gunicorn -k uvicorn_worker.UvicornWorker orchestrator_site.asgi:application."
        )
        return [json.dumps({"detail": detail}).encode()]


# --- what relays share -----------------------------------------------------------------------


async def start_response(send: Send, status: int, content_type: str, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", content_type.encode()), (b"cache-control", b"no-cache")]
    if content_type.startswith("text/event-stream"):
        raw.append((b"x-accel-buffering", b"no"))  # nginx: pass events on at once
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})


async def send_json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    await start_response(send, status, "application/json", headers)
    await send({"type": "http.response.body", "body": json.dumps(body, separators=(",", ":")).encode()})


async def send_event(send: Send, data: str, *, event: str | None = None, event_id: str | None = None) -> None:
    """One Server-Sent Event (``more_body``: the stream stays open)."""
    lines = []
    if event_id:
        lines.append(f"id: {event_id}")
    if event:
        lines.append(f"event: {event}")
    lines.append(f"data: {data}")
    await send({"type": "http.response.body", "body": ("\n".join(lines) + "\n\n").encode(), "more_body": True})


async def end_stream(send: Send) -> None:
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body was read by Django already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Run ``work`` until it finishes or the client goes: ``(client_gone, result)``."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, gone):
            if not pending.done():
                pending.cancel()
                _, stuck = await asyncio.wait({pending}, timeout=CLEANUP_S)
                if stuck:  # never hold the answer (or the cancel of a client's job) on a cleanup
                    log.warning("relay task did not stop within %.1f s of its cancel", CLEANUP_S)
                elif not pending.cancelled() and pending.exception() is not None:
                    log.warning("relay task failed", exc_info=pending.exception())
    if task in done:
        return False, task.result()
    return True, None
