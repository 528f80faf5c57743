"""The relays behind ``GET /jobs/<id>/stream`` (the job's deltas as Server-Sent Events) and ``?wait=``.

The views (``jobs.api.views``) check access in Django and answer a relay ticket; these run on the event loop
(``orchestrator_site.relaying``). Events are the job's delta stream (``jobs.deltas``) with their Redis
stream ids as SSE ids, so a client resumes with ``Last-Event-ID`` (or ``?after=``) after a dropped
connection; the stream ends with one ``end`` event carrying the job's result document.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from jobs import relay
from jobs.api.serializers import RESULT_FIELDS
from jobs.models import TERMINAL_STATES
from orchestrator_site import relaying

STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def result_document(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc.get(k) for k in RESULT_FIELDS}


def pending_document(doc: dict[str, Any]) -> dict[str, Any]:
    return {"id": doc["id"], "state": doc["state"], "links": doc["links"]}


def wait_seconds(request: Request) -> float:
    """``?wait=`` as seconds (0: do not wait); a 400 names anything but a number in range."""
    raw = request.query_params.get("wait")
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    limit = settings.RESULT_WAIT_MAX_S
    if not 0 <= value <= limit:
        raise ValidationError({"wait": [f"Must be a number of seconds from 0 to {limit}."]})
    return value


def result_ticket_or_response(doc: dict[str, Any], wait_s: float) -> Any:
    """What ``GET /jobs/<id>/result`` answers: the result, a 202, or (``wait_s``) a ticket to wait."""
    if doc["state"] in TERMINAL_STATES:
        return Response(result_document(doc))
    if wait_s > 0:
        return relaying.ticket("job.wait", job_id=doc["id"], wait_s=wait_s)
    return Response(pending_document(doc), status=202, headers={"Retry-After": "1"})


async def relay_events(order: dict[str, Any], scope: Any, receive: Any, send: Any) -> None:
    """SSE of one job's events; the client going away ends the relay (the job runs on)."""
    job_id = order["job_id"]
    notifier = relay.notifier()
    await relaying.start_response(send, 200, "text/event-stream; charset=utf-8", {"X-Job-Id": job_id})

    async def pump() -> None:
        async for event_id, event in notifier.events(job_id, order.get("after") or "0-0", idle_s=relaying.HEARTBEAT_S):
            kind = event.get("type", "delta")
            if kind == "end":  # the worker's; the relay's own end below carries the result
                continue
            if kind == "idle":  # quiet for a while: a comment keeps proxies from closing the stream
                await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
            elif kind == "done":
                doc = event.get("status") or {"id": job_id, "state": "unknown"}
                await relaying.send_event(send, json.dumps(result_document(doc), default=str), event="end")
                return
            else:
                await relaying.send_event(send, json.dumps(event), event=kind, event_id=event_id)

    gone, _ = await relaying.until_disconnect(receive, pump())
    if not gone:
        await relaying.end_stream(send)


async def relay_result(order: dict[str, Any], scope: Any, receive: Any, send: Any) -> None:
    """``?wait=``: the result as soon as the job ends, else the 202 after ``wait_s``."""
    job_id, notifier = order["job_id"], relay.notifier()

    async def until_done() -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(order["wait_s"]):
                async for _, event in notifier.events(job_id):
                    if event.get("type") == "done":
                        return event.get("status")
        except TimeoutError:
            pass
        return await notifier.status(job_id)

    gone, doc = await relaying.until_disconnect(receive, until_done())
    if gone:
        return
    if doc is not None and doc.get("state") in TERMINAL_STATES:
        await relaying.send_json(send, 200, result_document(doc))
    else:
        pending = pending_document(doc) if doc else {"id": job_id, "state": "unknown", "links": {}}
        await relaying.send_json(send, 202, pending, {"Retry-After": "1"})
