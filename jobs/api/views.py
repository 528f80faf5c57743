"""``/jobs``: submit, list, status, result, cancel."""

from __future__ import annotations

import uuid
from typing import Any

from django.db import transaction
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from jobs import queue_position, services, status_mirror
from jobs.api import stream
from jobs.api.schema import (
    JobDetailSerializer,
    JobPendingSerializer,
    JobResultSerializer,
    JobStatusSerializer,
)
from jobs.api.serializers import (
    JobCreateSerializer,
    JobSerializer,
    public,
    validate_submission,
)
from jobs.models import Job, JobState, Priority
from orchestrator_site import relaying
from orchestrator_site.negotiation import AlsoAnswers
from tenants.identity import tenant_of

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 255


class JobCursorPagination(CursorPagination):
    """Cursor paging stays fast on a table of millions (no COUNT, no OFFSET)."""

    ordering = "-created_at"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def get_page_size(self, request: Request) -> int:
        """``page_size`` (capped at ``max_page_size``); anything but a positive integer is a 400, not ignored."""
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        try:
            size = int(raw)
        except ValueError:
            size = 0
        if size < 1:
            raise ValidationError({self.page_size_query_param: ["Must be a positive integer."]})
        return min(size, self.max_page_size)

    def decode_cursor(self, request: Request):
        try:
            return super().decode_cursor(request)
        except NotFound:  # DRF answers 404 for a mangled cursor: it is bad input, not a missing page
            raise ValidationError({self.cursor_query_param: ["Invalid cursor."]}) from None


def _visible(request: Request):
    qs = Job.objects.all()
    return qs if request.user.is_staff else qs.filter(created_by=request.user)


def _job_uuid(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise NotFound(f"No job with id {job_id!r} (job ids are UUIDs).") from None


def _status_doc(request: Request, job_id: str) -> dict[str, Any]:
    """The status document from Redis, or the database when the mirror has no entry."""
    job_id = str(_job_uuid(job_id))
    doc = status_mirror.read(job_id)
    if doc is None:
        try:
            job = Job.objects.get(pk=job_id)
        except Job.DoesNotExist:
            raise NotFound(f"No job with id {job_id}.") from None
        doc = job.status_document()
        status_mirror.publish(job)
    if not request.user.is_staff and doc.get("owner_id") != request.user.pk:
        raise NotFound(f"No job with id {job_id}.")
    return doc


class JobListCreate(generics.GenericAPIView):
    serializer_class = JobCreateSerializer
    pagination_class = JobCursorPagination

    def get_queryset(self):
        return _visible(self.request)

    @extend_schema(
        request=JobCreateSerializer,
        responses={
            202: JobStatusSerializer,
            200: OpenApiResponse(JobStatusSerializer, description="Replayed: the job this Idempotency-Key made."),
            403: OpenApiResponse(
                description="The tenant may not: disabled, a priority above its max_priority, or a backend"
                " outside its allowed_backends (`limit` names the rule)."
            ),
            409: OpenApiResponse(description="The Idempotency-Key is in use by a request still in progress."),
            429: OpenApiResponse(
                description="Over a limit (`limit`: rpm_limit, tokens_per_day, budget_usd, max_queued or"
                " queue_max_depth); retry after `Retry-After` seconds (also `retry_after`). Nothing was kept."
            ),
            422: OpenApiResponse(
                description="The pinned backend cannot take this job, or the key was used with another body."
            ),
        },
        parameters=[OpenApiParameter(IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER, required=False)],
        summary="Submit a job",
    )
    def post(self, request: Request) -> Response:
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not (0 < len(key.strip()) <= MAX_IDEMPOTENCY_KEY):
            raise ValidationError({IDEMPOTENCY_HEADER: [f"Must be 1 to {MAX_IDEMPOTENCY_KEY} characters."]})
        data = validate_submission(request.data)
        submission = services.submit(
            data, user=request.user, body=request.data, idempotency_key=key, tenant=tenant_of(request)
        )
        doc = submission.document
        headers = {"Location": request.build_absolute_uri(f"/jobs/{doc['id']}")}
        if not submission.created:
            headers["Idempotent-Replayed"] = "true"
        code = status.HTTP_202_ACCEPTED if submission.created else status.HTTP_200_OK
        return Response(public(doc), status=code, headers=headers)

    @extend_schema(
        responses=JobStatusSerializer(many=True),
        parameters=[
            OpenApiParameter("state", str, enum=JobState.values),
            OpenApiParameter("priority", str, enum=Priority.values),
            OpenApiParameter("backend", str),
        ],
        summary="List jobs, newest first",
    )
    def get(self, request: Request) -> Response:
        qs = self.get_queryset()
        for name, choices in (("state", JobState.values), ("priority", Priority.values)):
            value = request.query_params.get(name)
            if value:
                if value not in choices:
                    raise ValidationError({name: [f"Must be one of: {', '.join(choices)}."]})
                qs = qs.filter(**{name: value})
        if backend := request.query_params.get("backend"):
            qs = qs.filter(backend_name=backend)
        page = self.paginate_queryset(qs.prefetch_related("attempts"))
        data = [public(dict(JobSerializer(job).data)) for job in page]
        return self.get_paginated_response(data)


def with_place(doc: dict[str, Any]) -> dict[str, Any]:
    """A waiting job's ``queue_position`` and ``eta_s`` (``jobs.queue_position``); null once it left the queue."""
    place = queue_position.UNKNOWN
    if doc.get("state") == JobState.QUEUED and doc.get("queue"):
        place = queue_position.place(doc["queue"], doc.get("tenant_id"), doc["id"])
        if place.position is None and doc.get("enqueued_at") is None:  # a batch line its window holds back
            place = queue_position.held_place(doc["id"])
    return {**doc, "queue_position": place.position, "eta_s": place.eta_s}


class JobDetail(APIView):
    @extend_schema(responses=JobDetailSerializer, summary="A job's status")
    def get(self, request: Request, job_id: str) -> Response:
        return Response(public(with_place(_status_doc(request, job_id))))


class JobResult(APIView):
    @extend_schema(
        parameters=[OpenApiParameter("wait", float, description="Seconds to wait for the end (long poll).")],
        responses={200: JobResultSerializer, 202: JobPendingSerializer},
        summary="A job's result (202 until done; ?wait=N waits up to N s first)",
    )
    def get(self, request: Request, job_id: str) -> Response:
        doc = _status_doc(request, job_id)
        return stream.result_ticket_or_response(doc, stream.wait_seconds(request))


class JobStream(AlsoAnswers, APIView):
    also_answers = ("text/event-stream",)  # EventSource's Accept: the relay answers in it, errors in JSON

    @extend_schema(
        parameters=[
            OpenApiParameter("Last-Event-ID", str, OpenApiParameter.HEADER, required=False),
            OpenApiParameter("after", str, description="Resume after this event id (as Last-Event-ID)."),
        ],
        responses={200: OpenApiResponse(description="text/event-stream: delta, reset and end events.")},
        summary="A job's output as Server-Sent Events",
    )
    def get(self, request: Request, job_id: str) -> Any:
        doc = _status_doc(request, job_id)
        after = request.headers.get("Last-Event-ID") or request.query_params.get("after") or "0-0"
        if not stream.STREAM_ID.match(after):
            raise ValidationError({"Last-Event-ID": ["Must be an event id this stream sent (e.g. 1712345678901-0)."]})
        return relaying.ticket("job.stream", job_id=doc["id"], after=after)


class JobCancel(APIView):
    @extend_schema(
        request=None,
        responses={
            200: JobStatusSerializer,
            409: OpenApiResponse(description="The job has already ended: `state` names its state."),
        },
        summary="Cancel a queued or running job",
    )
    def post(self, request: Request, job_id: str) -> Response:
        try:
            job = _visible(request).get(pk=_job_uuid(job_id))
        except Job.DoesNotExist:
            raise NotFound(f"No job with id {job_id}.") from None
        with transaction.atomic():
            canceled = job.cancel()
        if not canceled:
            job.refresh_from_db()
            return Response(
                {"detail": f"Job is {job.state}; only queued or running jobs can be canceled.", "state": job.state},
                status=status.HTTP_409_CONFLICT,
            )
        return Response(public(job.status_document()))
