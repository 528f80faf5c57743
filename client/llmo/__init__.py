"""LLM Orchestrator's Python client: :class:`Client` (and :class:`AsyncClient`), typed results and errors.

from llmo import Client

with Client("http://127.0.0.1:8000", token="...") as llmo:
    job = llmo.submit("Summarize: ...", priority="high")
    print(llmo.wait(job.id, timeout=60).output)
"""

from llmo._core import __version__
from llmo.aio import AsyncClient
from llmo.client import Client
from llmo.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    LlmoError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    TransportError,
    Unauthorized,
    Unprocessable,
    WaitTimeout,
)
from llmo.models import (
    Attempt,
    Batch,
    BatchError,
    FileObject,
    Job,
    JobResult,
    Message,
    Page,
    RequestCounts,
    StreamEvent,
)

__all__ = [
    "ApiError",
    "AsyncClient",
    "Attempt",
    "BadRequest",
    "Batch",
    "BatchError",
    "Client",
    "Conflict",
    "FileObject",
    "Forbidden",
    "Job",
    "JobResult",
    "LlmoError",
    "Message",
    "NotFound",
    "Page",
    "PayloadTooLarge",
    "RateLimited",
    "RequestCounts",
    "ServerError",
    "ServiceUnavailable",
    "StreamEvent",
    "TransportError",
    "Unauthorized",
    "Unprocessable",
    "WaitTimeout",
    "__version__",
]
