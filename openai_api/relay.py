"""The answer to ``POST /v1/chat/completions``, on the event loop (``orchestrator_site.relaying``).

Streamed: the job's deltas become ``chat.completion.chunk`` events as the worker publishes them,
then a chunk with the ``finish_reason``, the usage chunk when asked (``stream_options``), and
``data: [DONE]``. Not streamed: one ``chat.completion`` when the job ends. Either way a client that
goes away cancels its job: a queued job leaves its queue, a running one's backend call is closed.

A job that fails answers OpenAI's error object: before the stream started, with a status (422 for a
failed job, 410 canceled, 503 expired in its queue); after, as an ``error`` event ending the stream
(what OpenAI's SDKs raise as ``APIError``). A retry that starts again after text was sent cannot be
spliced into what the client already has, so that stream ends with an error naming the job, whose
result stays readable at ``/jobs/<id>/result``.
"""

from __future__ import annotations

from typing import Any

from jobs import relay
from openai_api import errors, translate
from orchestrator_site import relaying


def failure(doc: dict[str, Any] | None, job_id: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, OpenAI error body and headers for a job that did not succeed."""
    if doc is None:
        return 404, errors.body(404, f"Job {job_id} no longer exists.", code="job_not_found"), {}
    state, reason = doc.get("state"), doc.get("error") or ""
    if state == "expired":
        message = reason or "The job was not started within its queue timeout."
        return 503, errors.body(503, message, code="queue_timeout"), {"Retry-After": "5"}
    if state == "canceled":
        return 410, errors.body(410, reason or "The job was canceled.", code="job_canceled"), {}
    return 422, errors.body(422, reason or "The job failed.", code="job_failed"), {}


async def relay_completion(order: dict[str, Any], scope: Any, receive: Any, send: Any) -> None:
    job_id = order["job_id"]
    notifier = relay.notifier()
    headers = {"X-Job-Id": job_id}
    if order.get("stream"):
        await relaying.start_response(send, 200, "text/event-stream; charset=utf-8", headers)
        gone, _ = await relaying.until_disconnect(receive, _stream(order, notifier, send))
        if gone:
            await relay.cancel(job_id)
            return
        await relaying.end_stream(send)
        return

    async def until_done() -> dict[str, Any] | None:
        async for _, event in notifier.events(job_id):
            if event.get("type") == "done":
                return event.get("status")
        return None

    gone, doc = await relaying.until_disconnect(receive, until_done())
    if gone:
        await relay.cancel(job_id)
        return
    if doc is not None and doc.get("state") == "succeeded":
        answer = translate.completion(doc, model=order["model"], created=order["created"])
        await relaying.send_json(send, 200, answer, headers)
        return
    status, body, extra = failure(doc, job_id)
    await relaying.send_json(send, status, body, {**headers, **extra})


async def _stream(order: dict[str, Any], notifier: relay.Notifier, send: Any) -> None:
    job_id, model, created = order["job_id"], order["model"], order["created"]
    started = tool_calls_sent = False

    async def emit(delta: dict[str, Any] | None = None, finish: str | None = None) -> None:
        body = translate.chunk(job_id, model=model, created=created, delta=delta, finish=finish)
        await relaying.send_event(send, translate.dumps(body))

    async for _, event in notifier.events(job_id, idle_s=relaying.HEARTBEAT_S):
        kind = event.get("type", "delta")
        if kind == "idle":
            await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
        elif kind == "reset" and started:
            message = (
                f"The backend failed mid-answer and job {job_id} is being retried; "
                f"read its result at /jobs/{job_id}/result."
            )
            await relaying.send_event(send, translate.dumps(errors.body(503, message, code="retried_mid_stream")))
            return
        elif kind == "done":
            doc = event.get("status")
            if doc is None or doc.get("state") != "succeeded":
                _, body, _ = failure(doc, job_id)
                await relaying.send_event(send, translate.dumps(body))
                return
            if not started:  # a backend that published nothing (or a replayed, finished job): the whole answer
                whole = {"role": "assistant", "content": doc.get("output") or ""}
                if doc.get("tool_calls"):
                    whole["tool_calls"] = [{"index": i, **call} for i, call in enumerate(doc["tool_calls"])]
                await emit(whole)
            elif doc.get("tool_calls") and not tool_calls_sent:
                await emit({"tool_calls": [{"index": i, **call} for i, call in enumerate(doc["tool_calls"])]})
            await emit({}, translate.finish_reason(doc))
            if order.get("include_usage"):
                usage = translate.chunk(job_id, model=model, created=created)
                usage["usage"] = translate.usage(doc)
                await relaying.send_event(send, translate.dumps(usage))
            await relaying.send_event(send, "[DONE]")
            return
        elif kind == "delta":
            delta = translate.delta_of(event)
            if delta is None:
                continue
            if not started:
                delta = {"role": "assistant", "content": "", **delta}
                started = True
            tool_calls_sent = tool_calls_sent or "tool_calls" in delta
            await emit(delta)
