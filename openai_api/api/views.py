"""``/v1``: OpenAI's Chat Completions and Models endpoints over our jobs.

Every completion is a job submitted as ``POST /jobs`` submits one (``jobs.services.submit``: the
same caps, admission, routing, idempotency and queues); the view answers a relay ticket and
``openai_api.relay`` waits for the job on the event loop and answers as OpenAI does.
"""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from jobs import services
from jobs.api.views import IDEMPOTENCY_HEADER, MAX_IDEMPOTENCY_KEY
from openai_api import errors, translate, validation
from openai_api.api import schema
from orchestrator_site import relaying
from orchestrator_site.negotiation import AlsoAnswers
from orchestrator_site.redis import redis_client
from routing import registry
from tenants.identity import tenant_of
from tenants.models import Tenant


class OpenAIView(AlsoAnswers, APIView):
    """Errors in OpenAI's shape (``openai_api.errors``), and so documented (``orchestrator_site.schema``)."""

    error_serializer = schema.OpenAIError
    also_answers = ("text/event-stream",)  # a streamed completion asked for so: the relay answers in it

    def get_exception_handler(self):  # noqa: ANN201 (DRF's hook)
        return errors.exception_handler


def _snapshot() -> registry.Snapshot:
    return registry.snapshot(registry.ensure_token(redis_client().get(registry.VERSION_KEY)))


def served_models(snap: registry.Snapshot, tenant: Tenant | None = None) -> list[str]:
    """``auto``, then every enabled backend's name and model the caller may use, each once, sorted."""
    names: set[str] = set()
    for backend in snap.backends.values():
        if backend.enabled and (tenant is None or tenant.allows_backend(backend.name)):
            names.add(backend.name)
            if backend.model:
                names.add(backend.model)
    return [translate.AUTO, *sorted(names - {translate.AUTO})]


def _resolve_model(job: dict[str, Any], model: str) -> None:
    """A backend name pins that backend; a model name lets routing choose among its backends."""
    if model == translate.AUTO:
        return
    # The process's last snapshot answers without a round trip; the submit routes on the current one
    # (and refuses a backend disabled since). Only a name it does not know costs a fresh read.
    last = registry.last()
    if last is not None and _pick(job, model, last):
        return
    if _pick(job, model, _snapshot()):
        return
    raise NotFound(f"The model '{model}' does not exist or you do not have access to it.", code="model_not_found")


def _pick(job: dict[str, Any], model: str, snap: registry.Snapshot) -> bool:
    """Whether ``snap`` serves ``model``: a backend's name (pinned) or a model some backend serves."""
    backend = snap.backends.get(model)
    if backend is not None and backend.enabled:
        job.pop("model", None)
        job["backend"] = model
        return True
    return any(b.enabled and b.model == model for b in snap.backends.values())


class ChatCompletions(OpenAIView):
    @extend_schema(
        request=schema.ChatCompletionRequest,
        responses=schema.COMPLETION_RESPONSES,
        summary="OpenAI Chat Completions (streamed or not)",
        description="See docs/openai.md. Errors in OpenAI's shape.",
    )
    def post(self, request: Request) -> Any:
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not (0 < len(key.strip()) <= MAX_IDEMPOTENCY_KEY):
            raise translate.InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters.")
        chat, images = validation.checked(
            request.data, priority_header=request.headers.get("X-Priority"), limits=settings.JOB_LIMITS
        )
        job = chat.job
        if images:
            job["images"] = images
        _resolve_model(job, chat.model)
        job["stream"] = chat.stream
        submission = services.submit(
            job, user=request.user, body=request.data, idempotency_key=key, tenant=tenant_of(request)
        )
        return relaying.ticket(
            "chat",
            job_id=submission.document["id"],
            stream=chat.stream,
            include_usage=chat.include_usage,
            model=chat.model,
            created=int(time.time()),
        )


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llm-orchestrator"}


class Models(OpenAIView):
    @extend_schema(
        request=None,
        responses=schema.ModelList,
        summary="OpenAI model list: auto, and the enabled backends and models the caller may use",
        operation_id="v1_models_list",
    )
    def get(self, request: Request) -> Response:
        return Response(
            {"object": "list", "data": [_model_object(n) for n in served_models(_snapshot(), tenant_of(request))]}
        )


class ModelDetail(OpenAIView):
    @extend_schema(request=None, responses=schema.Model, summary="One model")
    def get(self, request: Request, model: str) -> Response:
        if model not in served_models(_snapshot(), tenant_of(request)):
            raise NotFound(
                f"The model '{model}' does not exist or you do not have access to it.", code="model_not_found"
            )
        return Response(_model_object(model))


@extend_schema(exclude=True)
class UnknownEndpoint(OpenAIView):
    """A path under /v1 that is not one of ours answers as OpenAI does, whatever the method."""

    def http_method_not_allowed(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        raise NotFound(f"Unknown request URL: {request.method} {request.path}.", code="unknown_url")
