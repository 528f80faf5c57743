"""The asyncio client: :class:`AsyncClient`, the same calls as :class:`llmo.Client`, awaited."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from llmo import _core
from llmo._core import RetryBudget, Settings, segment
from llmo.errors import ApiError, TransportError, WaitTimeout, error_from_response
from llmo.models import Batch, FileObject, Job, JobResult, Message, Page, StreamEvent


class AsyncClient:
    """:class:`llmo.Client` for asyncio: the same methods and rules, each a coroutine (``stream``, ``jobs`` and
    ``batches`` are async iterators).

    LLM Orchestrator's API: jobs (submit, wait, stream, cancel, list) and OpenAI-format batches.

    ``base_url`` and ``token`` default to ``$LLMO_URL`` (else ``http://127.0.0.1:8000``) and ``$LLMO_TOKEN``.
    Connection errors and 503s are retried up to ``max_retries`` times (honouring ``Retry-After``), only
    where repeating the request cannot do anything twice; a 429 is retried after its ``Retry-After`` while
    those waits add up to at most ``rate_limit_wait`` seconds (0: raise :class:`~llmo.errors.RateLimited`
    at once). ``timeout`` is per HTTP request; long polls and streams add their own wait to it.
    ``long_poll=False`` makes :meth:`wait` poll (sleeping ``Retry-After``) instead of long-polling.
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        rate_limit_wait: float = 0.0,
        long_poll: bool = True,
        limits: httpx.Limits | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = Settings.resolve(base_url, token, timeout, max_retries, rate_limit_wait)
        self._http = httpx.AsyncClient(
            base_url=self.settings.base_url,
            headers=self.settings.headers(),
            timeout=self.settings.timeout,
            limits=limits or httpx.Limits(max_connections=100, max_keepalive_connections=20),
            transport=transport,
        )
        self._long_poll = long_poll  # until the server shows it cannot (a WSGI server)

    # --- plumbing ---------------------------------------------------------------------------
    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        files: Any = None,
        data: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | float | None = None,
        stream: bool = False,
        rate_limit_wait: float | None = None,
    ) -> httpx.Response:
        """Send one API call with the retry rules of :class:`~llmo._core.RetryBudget`; any error answer raises."""
        wait = self.settings.rate_limit_wait if rate_limit_wait is None else rate_limit_wait
        budget = RetryBudget(self.settings.max_retries, wait)
        while True:
            request = self._http.build_request(
                method,
                path,
                params=params,
                json=json_body,
                headers=headers,
                files=files() if callable(files) else files,
                data=data,
                timeout=timeout if timeout is not None else self.settings.timeout,
            )
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = budget.after_transport_error(exc, idempotent)
                if delay is None:
                    raise TransportError(f"{method} {request.url}: {exc!r}") from exc
                await asyncio.sleep(delay)
                continue
            if response.is_success:
                return response
            content = await response.aread()
            await response.aclose()
            err = error_from_response(response.status_code, response.headers, content, response.reason_phrase)
            delay = budget.after_error(err, idempotent)
            if delay is None:
                raise err
            await asyncio.sleep(delay)

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        kwargs.setdefault("idempotent", method == "GET")
        return (await self._request(method, path, **kwargs)).json()

    # --- jobs -------------------------------------------------------------------------------
    async def submit(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message | Mapping[str, str]] | None = None,
        images: Sequence[str | bytes | Path] | None = None,
        priority: str | None = None,
        model: str | None = None,
        backend: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        params: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        timeout_s: int | None = None,
        queue_timeout_s: int | None = None,
        requires_multimodal: bool | None = None,
        stream: bool | None = None,
        idempotency_key: str | None = None,
        rate_limit_wait: float | None = None,
    ) -> Job:
        """``POST /jobs``: exactly one of ``prompt`` and ``messages``; the other fields as in docs/api.md.

        Every submission carries an ``Idempotency-Key`` (a new UUID unless given) that its retries reuse,
        so a retry after a lost answer returns the same job (``Job.replayed``) instead of a second one.
        """
        body = _core.submit_body(
            prompt,
            messages=messages,
            images=images,
            priority=priority,
            model=model,
            backend=backend,
            max_tokens=max_tokens,
            temperature=temperature,
            params=params,
            metadata=metadata,
            timeout_s=timeout_s,
            queue_timeout_s=queue_timeout_s,
            requires_multimodal=requires_multimodal,
            stream=stream,
        )
        key = idempotency_key or _core.new_idempotency_key()
        response = await self._request(
            "POST",
            "/jobs",
            idempotent=True,
            json_body=body,
            headers={"Idempotency-Key": key},
            rate_limit_wait=rate_limit_wait,
        )
        replayed = response.headers.get("idempotent-replayed", "").lower() == "true"
        return Job.from_dict(response.json(), replayed=replayed)

    async def get(self, job_id: str) -> Job:
        """``GET /jobs/<id>``: the status document (with ``queue_position`` and ``eta_s`` while queued)."""
        return Job.from_dict(await self._json("GET", f"/jobs/{segment(job_id)}"))

    async def result(self, job_id: str) -> JobResult:
        """``GET /jobs/<id>/result`` now: the result once final, else only ``id`` and ``state``."""
        return JobResult.from_dict(await self._json("GET", f"/jobs/{segment(job_id)}/result"))

    async def wait(self, job_id: str, timeout: float | None = None, *, poll_interval: float | None = None) -> JobResult:
        """Wait until the job ends and return its result (whatever the state: check ``result.succeeded``).

        Long-polls ``/result?wait=`` (one request per 30 s, answered the moment the job ends); where the
        server cannot (a WSGI server) or ``poll_interval`` is given, polls instead, sleeping ``Retry-After``
        (or ``poll_interval``) between tries. Raises :class:`~llmo.errors.WaitTimeout` after ``timeout`` s.
        """
        start = time.monotonic()
        path, state = f"/jobs/{segment(job_id)}/result", None
        while True:
            left = None if timeout is None else timeout - (time.monotonic() - start)
            if left is not None and left <= 0:
                raise WaitTimeout("job", job_id, state, time.monotonic() - start)
            chunk = _core.LONG_POLL_S if left is None else min(_core.LONG_POLL_S, left)
            long_poll = self._long_poll and poll_interval is None and chunk >= 0.05
            params = {"wait": f"{chunk:.2f}"} if long_poll else None
            try:
                response = await self._request(
                    "GET", path, idempotent=True, params=params, timeout=self.settings.timeout + chunk
                )
            except ApiError as err:
                if long_poll and _core.long_poll_unsupported(err):
                    self._long_poll = False
                    continue
                raise
            doc = response.json()
            if response.status_code == 200:
                return JobResult.from_dict(doc)
            state = doc.get("state", state)
            if not long_poll:
                delay = _core.poll_delay(response, poll_interval)
                left = None if timeout is None else timeout - (time.monotonic() - start)
                await asyncio.sleep(delay if left is None else max(0.0, min(delay, left)))

    async def cancel(self, job_id: str) -> Job:
        """``POST /jobs/<id>/cancel``; a job that has already ended raises :class:`~llmo.errors.Conflict`."""
        return Job.from_dict(await self._json("POST", f"/jobs/{segment(job_id)}/cancel"))

    async def stream(self, job_id: str, *, after: str | None = None) -> AsyncIterator[StreamEvent]:
        """The events of ``GET /jobs/<id>/stream`` until the ``end`` event (whose ``result`` is the job's result).

        A dropped connection is resumed after the last event received (``Last-Event-ID``), up to
        ``max_retries`` times in a row; ``after`` starts after that event id instead of from the beginning.
        """
        path, last, drops = f"/jobs/{segment(job_id)}/stream", after, 0
        timeout = httpx.Timeout(self.settings.timeout, read=max(self.settings.timeout, _core.STREAM_READ_TIMEOUT_S))
        while True:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last} if last else {})}
            response = await self._request("GET", path, idempotent=True, headers=headers, timeout=timeout, stream=True)
            decoder = _core.SSEDecoder()
            try:
                async for line in response.aiter_lines():
                    event = decoder.feed(line)
                    if event is None:
                        continue
                    drops = 0
                    last = event.id or last
                    yield event
                    if event.event == "end":
                        return
            except httpx.TransportError as exc:
                if drops >= self.settings.max_retries:
                    raise TransportError(f"GET {path}: the stream broke: {exc!r}") from exc
            finally:
                await response.aclose()
            drops += 1  # the connection ended before the end event: resume after the last one
            if drops > self.settings.max_retries:
                raise TransportError(f"GET {path}: the stream ended {drops} times without its end event")
            await asyncio.sleep(_core.backoff(drops - 1))

    async def jobs_page(
        self,
        *,
        state: str | None = None,
        priority: str | None = None,
        backend: str | None = None,
        page_size: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """One page of ``GET /jobs`` (newest first); pass its ``next_cursor`` back as ``cursor`` for the next."""
        params = _core.list_params(state=state, priority=priority, backend=backend, page_size=page_size, cursor=cursor)
        doc = await self._json("GET", "/jobs", params=params)
        return Page(
            items=[Job.from_dict(item) for item in doc.get("results", [])],
            next_cursor=_core.cursor_of(doc.get("next")),
            previous_cursor=_core.cursor_of(doc.get("previous")),
        )

    async def jobs(
        self,
        *,
        state: str | None = None,
        priority: str | None = None,
        backend: str | None = None,
        limit: int | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Job]:
        """Your jobs (staff: everyone's), newest first, following the pages; at most ``limit`` of them."""
        if limit is not None and page_size is None:
            page_size = max(1, min(limit, 500))
        cursor, count = None, 0
        while True:
            page = await self.jobs_page(
                state=state, priority=priority, backend=backend, page_size=page_size, cursor=cursor
            )
            for job in page.items:
                if limit is not None and count >= limit:
                    return
                count += 1
                yield job
            if not page.next_cursor or (limit is not None and count >= limit):
                return
            cursor = page.next_cursor

    # --- files and batches (OpenAI's Batch API) --------------------------------------------------
    async def files_upload(
        self, file: str | Path | bytes | BinaryIO, *, purpose: str = "batch", filename: str | None = None
    ) -> FileObject:
        """``POST /v1/files`` (multipart): a JSONL of requests for a batch. ``file``: a path, bytes or a file."""
        content, name = _core.file_bytes(file), _core.file_name(file, filename)
        doc = await self._json(
            "POST",
            "/v1/files",
            data={"purpose": purpose},
            files=lambda: {"file": (name, content, "application/jsonl")},
        )
        return FileObject.from_dict(doc)

    async def file_get(self, file_id: str) -> FileObject:
        return FileObject.from_dict(await self._json("GET", f"/v1/files/{segment(file_id)}"))

    async def file_content(self, file_id: str) -> bytes:
        """``GET /v1/files/<id>/content``: the file's bytes (a batch's output or error JSONL)."""
        return (await self._request("GET", f"/v1/files/{segment(file_id)}/content", idempotent=True)).content

    async def file_delete(self, file_id: str) -> bool:
        return bool(await self._json("DELETE", f"/v1/files/{segment(file_id)}", idempotent=True).get("deleted"))

    async def batch_create(
        self,
        input_file_id: str,
        *,
        endpoint: str = "/v1/chat/completions",
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
    ) -> Batch:
        """``POST /v1/batches``: run every line of an uploaded file as a job."""
        body: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
        }
        if metadata is not None:
            body["metadata"] = dict(metadata)
        return Batch.from_dict(await self._json("POST", "/v1/batches", json_body=body))

    async def batch_get(self, batch_id: str) -> Batch:
        return Batch.from_dict(await self._json("GET", f"/v1/batches/{segment(batch_id)}"))

    async def batch_cancel(self, batch_id: str) -> Batch:
        """``POST /v1/batches/<id>/cancel``: ``cancelling``, then ``cancelled`` once its running lines end."""
        return Batch.from_dict(await self._json("POST", f"/v1/batches/{segment(batch_id)}/cancel"))

    async def batches(self, *, limit: int | None = None) -> AsyncIterator[Batch]:
        """``GET /v1/batches``, newest first, following ``has_more``/``after``; at most ``limit``."""
        after, count = None, 0
        while True:
            params = _core.list_params(after=after, limit=min(limit, 100) if limit else None)
            doc = await self._json("GET", "/v1/batches", params=params)
            for item in doc.get("data", []):
                if limit is not None and count >= limit:
                    return
                count += 1
                yield Batch.from_dict(item)
            after = doc.get("last_id")
            if not doc.get("has_more") or not after or (limit is not None and count >= limit):
                return

    async def batch_wait(self, batch_id: str, timeout: float | None = None, *, poll_interval: float = 2.0) -> Batch:
        """Poll until the batch is ``completed``, ``failed``, ``expired`` or ``cancelled``, and return it."""
        start = time.monotonic()
        while True:
            batch = await self.batch_get(batch_id)
            if batch.final:
                return batch
            waited = time.monotonic() - start
            if timeout is not None and waited >= timeout:
                raise WaitTimeout("batch", batch_id, batch.status, waited)
            await asyncio.sleep(poll_interval if timeout is None else max(0.0, min(poll_interval, timeout - waited)))

    async def batch_submit(
        self,
        file: str | Path | bytes | BinaryIO,
        *,
        endpoint: str = "/v1/chat/completions",
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
    ) -> Batch:
        """Upload a JSONL file and create its batch (:meth:`files_upload` then :meth:`batch_create`)."""
        uploaded = await self.files_upload(file)
        return await self.batch_create(
            uploaded.id, endpoint=endpoint, completion_window=completion_window, metadata=metadata
        )

    async def file_lines(self, file_id: str) -> list[dict[str, Any]]:
        """A JSONL file's lines, parsed (a batch's output: one ``{id, custom_id, response, error}`` per line)."""
        return [json.loads(line) for line in (await self.file_content(file_id)).decode().splitlines() if line.strip()]
