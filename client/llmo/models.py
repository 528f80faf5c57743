"""Typed views of the API's documents: jobs, results, stream events, files and batches.

Each is a frozen dataclass built by ``from_dict``; fields the server adds later are not lost: the whole
document stays in ``raw``. Timestamps are parsed to aware ``datetime`` objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict

JobState = Literal["queued", "running", "succeeded", "failed", "canceled", "expired"]
Priority = Literal["high", "normal", "low"]
BatchStatus = Literal[
    "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"
]

JOB_STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "canceled", "expired")
PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
TERMINAL_JOB_STATES = frozenset({"succeeded", "failed", "canceled", "expired"})
TERMINAL_BATCH_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})


class Message(TypedDict):
    """One chat message of a submission."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class Usage(TypedDict, total=False):
    prompt_tokens: int | None
    completion_tokens: int | None


def _time(value: Any) -> datetime | None:
    """An API timestamp (ISO 8601, or OpenAI's Unix seconds) as an aware datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return datetime.fromisoformat(str(value))


@dataclass(frozen=True)
class Attempt:
    """One try of a job on a backend (``attempt_log``)."""

    number: int
    backend: str | None
    worker: str | None
    outcome: str | None
    started_at: datetime | None
    finished_at: datetime | None
    latency_ms: int | None
    error: str | None

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Attempt:
        return cls(
            number=int(doc.get("number") or 0),
            backend=doc.get("backend"),
            worker=doc.get("worker"),
            outcome=doc.get("outcome"),
            started_at=_time(doc.get("started_at")),
            finished_at=_time(doc.get("finished_at")),
            latency_ms=doc.get("latency_ms"),
            error=doc.get("error"),
        )


@dataclass(frozen=True)
class Job:
    """A job's status document (``POST /jobs``, ``GET /jobs/<id>``, each entry of ``GET /jobs``)."""

    id: str
    state: JobState
    priority: Priority | None = None
    backend: str | None = None
    policy: str | None = None
    policy_version: int | None = None
    model: str | None = None
    queue: str | None = None
    attempts: int = 0
    created_at: datetime | None = None
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    usage: Usage | None = None
    cost: float | None = None
    latency_ms: int | None = None
    finish_reason: str | None = None
    metadata: dict[str, Any] | None = None
    attempt_log: list[Attempt] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)
    tenant: str | None = None
    queue_timeout_s: int | None = None
    expires_at: datetime | None = None
    queue_position: int | None = None
    eta_s: float | None = None
    replayed: bool = False  # POST /jobs answered an earlier job for this Idempotency-Key
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def final(self) -> bool:
        return self.state in TERMINAL_JOB_STATES

    @classmethod
    def from_dict(cls, doc: dict[str, Any], *, replayed: bool = False) -> Job:
        return cls(
            id=str(doc["id"]),
            state=doc["state"],
            priority=doc.get("priority"),
            backend=doc.get("backend"),
            policy=doc.get("policy"),
            policy_version=doc.get("policy_version"),
            model=doc.get("model"),
            queue=doc.get("queue"),
            attempts=int(doc.get("attempts") or 0),
            created_at=_time(doc.get("created_at")),
            enqueued_at=_time(doc.get("enqueued_at")),
            started_at=_time(doc.get("started_at")),
            finished_at=_time(doc.get("finished_at")),
            error=doc.get("error"),
            usage=doc.get("usage"),
            cost=doc.get("cost"),
            latency_ms=doc.get("latency_ms"),
            finish_reason=doc.get("finish_reason"),
            metadata=doc.get("metadata"),
            attempt_log=[Attempt.from_dict(a) for a in doc.get("attempt_log") or []],
            links=dict(doc.get("links") or {}),
            tenant=doc.get("tenant"),
            queue_timeout_s=doc.get("queue_timeout_s"),
            expires_at=_time(doc.get("expires_at")),
            queue_position=doc.get("queue_position"),
            eta_s=doc.get("eta_s"),
            replayed=replayed,
            raw=doc,
        )


@dataclass(frozen=True)
class JobResult:
    """``GET /jobs/<id>/result`` of a job that has ended (and the data of a stream's ``end`` event)."""

    id: str
    state: JobState
    backend: str | None = None
    output: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    cost: float | None = None
    latency_ms: int | None = None
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"

    @property
    def final(self) -> bool:
        """``False`` for the answer of :meth:`llmo.Client.result` while the job is still queued or running."""
        return self.state in TERMINAL_JOB_STATES

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> JobResult:
        return cls(
            id=str(doc["id"]),
            state=doc["state"],
            backend=doc.get("backend"),
            output=doc.get("output"),
            tool_calls=list(doc.get("tool_calls") or []),
            finish_reason=doc.get("finish_reason"),
            usage=doc.get("usage"),
            cost=doc.get("cost"),
            latency_ms=doc.get("latency_ms"),
            error=doc.get("error"),
            raw=doc,
        )


@dataclass(frozen=True)
class StreamEvent:
    """One Server-Sent Event of ``GET /jobs/<id>/stream``.

    ``event`` is ``delta`` (``content`` holds the new text, or ``data["tool_calls"]`` fragments),
    ``reset`` (a retry starts the output again: drop what you have) or ``end`` (``result`` is the
    job's result). ``id`` resumes the stream after this event (``stream(..., after=id)``).
    """

    event: str
    data: dict[str, Any]
    id: str | None = None

    @property
    def content(self) -> str:
        value = self.data.get("content") if self.event == "delta" else None
        return value if isinstance(value, str) else ""

    @property
    def result(self) -> JobResult | None:
        return JobResult.from_dict(self.data) if self.event == "end" else None

    @classmethod
    def parse(cls, event: str, data: str, event_id: str | None) -> StreamEvent:
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {"text": data}
        return cls(event=event or "message", data=doc if isinstance(doc, dict) else {"value": doc}, id=event_id)


@dataclass(frozen=True)
class Page:
    """One page of ``GET /jobs``; ``next_cursor`` fetches the next (``None``: the last page)."""

    items: list[Job]
    next_cursor: str | None = None
    previous_cursor: str | None = None


@dataclass(frozen=True)
class FileObject:
    """An uploaded or produced file (OpenAI's ``FileObject``)."""

    id: str
    bytes: int | None = None
    created_at: datetime | None = None
    filename: str | None = None
    purpose: str | None = None
    status: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> FileObject:
        return cls(
            id=str(doc["id"]),
            bytes=doc.get("bytes"),
            created_at=_time(doc.get("created_at")),
            filename=doc.get("filename"),
            purpose=doc.get("purpose"),
            status=doc.get("status"),
            raw=doc,
        )


@dataclass(frozen=True)
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class BatchError:
    """One entry of a batch's ``errors`` (a whole-file validation problem names its ``line``)."""

    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class Batch:
    """A batch (OpenAI's ``Batch``): its status, counts and the ids of its output and error files."""

    id: str
    status: BatchStatus
    endpoint: str | None = None
    input_file_id: str | None = None
    completion_window: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    errors: list[BatchError] = field(default_factory=list)
    metadata: dict[str, Any] | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None
    expires_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def final(self) -> bool:
        return self.status in TERMINAL_BATCH_STATUSES

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Batch:
        counts = doc.get("request_counts") or {}
        errors = doc.get("errors") or {}
        entries = errors.get("data") if isinstance(errors, dict) else errors
        return cls(
            id=str(doc["id"]),
            status=doc["status"],
            endpoint=doc.get("endpoint"),
            input_file_id=doc.get("input_file_id"),
            completion_window=doc.get("completion_window"),
            output_file_id=doc.get("output_file_id"),
            error_file_id=doc.get("error_file_id"),
            request_counts=RequestCounts(
                total=int(counts.get("total") or 0),
                completed=int(counts.get("completed") or 0),
                failed=int(counts.get("failed") or 0),
            ),
            errors=[
                BatchError(e.get("code"), e.get("message"), e.get("param"), e.get("line"))
                for e in entries or []
                if isinstance(e, dict)
            ],
            metadata=doc.get("metadata"),
            created_at=_time(doc.get("created_at")),
            completed_at=_time(doc.get("completed_at")),
            expires_at=_time(doc.get("expires_at")),
            raw=doc,
        )
