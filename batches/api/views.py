"""``/v1/files`` and ``/v1/batches``: OpenAI's Files (for batches) and Batch API over our jobs.

Errors in OpenAI's shape (``openai_api.errors``). A caller sees its own files and batches (a
tenant's key or member: the tenant's); any other id is a 404, as a missing one is.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import Q, QuerySet
from django.http import FileResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.exceptions import APIException, NotFound
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from batches import cancelling, finalizing, progress, services
from batches.api import schema
from batches.models import Batch, File, files_storage
from openai_api.api.views import OpenAIView
from openai_api.translate import InvalidRequest
from tenants.identity import tenant_of

MULTIPART_OVERHEAD = 64 * 1024  # room for the form's other fields and boundaries around the file


class FileTooLarge(APIException):
    status_code = 413
    default_code = "file_too_large"


class Conflict(APIException):
    status_code = 409
    default_code = "conflict"


def _page(request: Request, qs: QuerySet, *, max_limit: int, ascending: bool = False) -> tuple[list[Any], bool]:
    """OpenAI's cursor pages: ``limit`` objects after the object ``after`` (an id), newest first."""
    raw = request.query_params.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= max_limit:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {max_limit}.", "limit")
    limit = int(raw)
    sign = "" if ascending else "-"
    qs = qs.order_by(f"{sign}created_at", f"{sign}id")
    after = request.query_params.get("after")
    if after:
        anchor = qs.filter(pk=after).values_list("created_at", flat=True).first()
        if anchor is None:
            raise InvalidRequest(f"'after' names no object of yours: {after!r}.", "after")
        if ascending:
            qs = qs.filter(Q(created_at__gt=anchor) | Q(created_at=anchor, id__gt=after))
        else:
            qs = qs.filter(Q(created_at__lt=anchor) | Q(created_at=anchor, id__lt=after))
    rows = list(qs[: limit + 1])
    return rows[:limit], len(rows) > limit


def _list(objects: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": objects,
        "first_id": objects[0]["id"] if objects else None,
        "last_id": objects[-1]["id"] if objects else None,
        "has_more": has_more,
    }


def _file(request: Request, file_id: str) -> File:
    file = services.visible(File, request.user, tenant_of(request)).filter(pk=file_id).first()
    if file is None:
        raise NotFound(f"No such File object: {file_id}", code="file_not_found")
    return file


def _batch(request: Request, batch_id: str) -> Batch:
    batch = services.visible(Batch, request.user, tenant_of(request)).filter(pk=batch_id).first()
    if batch is None:
        raise NotFound(f"No such Batch object: {batch_id}", code="batch_not_found")
    return batch


class Files(OpenAIView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        request={"multipart/form-data": schema.FileUpload},
        responses={
            200: schema.FileObject,
            413: OpenApiResponse(
                description="The file is larger than FILES_MAX_BYTES (code `file_too_large`), or the form's other"
                " fields than MAX_REQUEST_BYTES."
            ),
        },
        summary="Upload a batch input file (JSONL; purpose=batch)",
        description="See docs/batches.md. The file is streamed to storage; its lines are checked when a batch uses it.",
        operation_id="v1_files_create",
    )
    def post(self, request: Request) -> Response:
        length = request.META.get("CONTENT_LENGTH") or ""
        limit = settings.FILES_MAX_BYTES
        if length.isdigit() and int(length) > limit + MULTIPART_OVERHEAD:
            raise FileTooLarge(f"The file is larger than the limit of {limit} bytes (FILES_MAX_BYTES).")
        form = schema.FileUpload(data=request.data)
        form.is_valid(raise_exception=True)  # an unknown field, or no file or purpose, is a 400 naming it
        upload = form.validated_data["file"]
        if upload.size > limit:
            raise FileTooLarge(f"The file is {upload.size} bytes; the limit is {limit} bytes (FILES_MAX_BYTES).")
        purpose = form.validated_data["purpose"]
        file = services.create_file(upload, purpose, user=request.user, tenant=tenant_of(request))
        return Response(file.as_openai())

    @extend_schema(
        request=None,
        parameters=schema.FILE_LIST_PARAMETERS,
        responses=schema.FileList,
        summary="The caller's files, newest first",
        operation_id="v1_files_list",
    )
    def get(self, request: Request) -> Response:
        qs = services.visible(File, request.user, tenant_of(request))
        purpose = request.query_params.get("purpose")
        if purpose:
            qs = qs.filter(purpose=purpose)
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest("'order' must be asc or desc.", "order")
        rows, more = _page(request, qs, max_limit=10_000, ascending=order == "asc")
        return Response(_list([f.as_openai() for f in rows], more))


class FileDetail(OpenAIView):
    @extend_schema(
        request=None,
        responses=schema.FileObject,
        summary="One file",
        operation_id="v1_files_retrieve",
    )
    def get(self, request: Request, file_id: str) -> Response:
        return Response(_file(request, file_id).as_openai())

    @extend_schema(
        request=None,
        responses={
            200: schema.FileDeleted,
            409: OpenApiResponse(description="A batch still reads the file (its input, validating or in progress)."),
        },
        summary="Delete a file (409 while a batch still reads it)",
        operation_id="v1_files_destroy",
    )
    def delete(self, request: Request, file_id: str) -> Response:
        file = _file(request, file_id)
        user = services.in_use(file)
        if user is not None:
            raise Conflict(f"File {file.pk} is the input of batch {user.pk}, which is still reading it.")
        finalizing.delete_file(file)
        return Response({"id": file_id, "object": "file", "deleted": True})


class FileContent(OpenAIView):
    # The SDK asks for application/binary; the bytes are sent as they are, and an error is JSON.
    also_answers = ("application/binary", "application/octet-stream", "application/jsonl", "text/plain")

    @extend_schema(request=None, responses=schema.CONTENT, summary="A file's contents", operation_id="v1_files_content")
    def get(self, request: Request, file_id: str) -> Any:
        file = _file(request, file_id)
        try:
            stream = files_storage().open(file.blob, "rb")
        except OSError:
            raise NotFound(f"The contents of file {file_id} are gone.", code="file_not_found") from None
        return FileResponse(stream, content_type="application/octet-stream", filename=file.filename)


class Batches(OpenAIView):
    @extend_schema(
        request=schema.BatchCreate,
        responses=schema.BatchObject,
        summary="Create a batch from an uploaded file",
        description="See docs/batches.md. Answers at once (validating); a worker checks the file and creates the jobs.",
        operation_id="v1_batches_create",
    )
    def post(self, request: Request) -> Response:
        batch = services.create_batch(request.data, user=request.user, tenant=tenant_of(request))
        return Response(batch.as_openai())

    @extend_schema(
        request=None,
        parameters=schema.PAGE_PARAMETERS,
        responses=schema.BatchList,
        summary="The caller's batches, newest first",
        operation_id="v1_batches_list",
    )
    def get(self, request: Request) -> Response:
        rows, more = _page(request, services.visible(Batch, request.user, tenant_of(request)), max_limit=100)
        return Response(_list([b.as_openai(progress.counts(b)) for b in rows], more))


class BatchDetail(OpenAIView):
    @extend_schema(
        request=None,
        responses=schema.BatchObject,
        summary="One batch, with its live request counts",
        operation_id="v1_batches_retrieve",
    )
    def get(self, request: Request, batch_id: str) -> Response:
        batch = _batch(request, batch_id)
        return Response(batch.as_openai(progress.counts(batch)))


class BatchCancel(OpenAIView):
    @extend_schema(
        request=None,
        responses={
            200: OpenApiResponse(
                schema.BatchObject, description="The batch, cancelling (or already cancelling or cancelled)."
            ),
            409: OpenApiResponse(
                description="The batch already ended (completed, failed or expired): code `batch_not_cancellable`."
            ),
        },
        summary="Cancel a batch: queued lines are cancelled, running ones finish, then the partial files",
        operation_id="v1_batches_cancel",
    )
    def post(self, request: Request, batch_id: str) -> Response:
        batch = _batch(request, batch_id)
        if not cancelling.request_cancel(batch) and batch.status not in ("cancelling", "cancelled"):
            raise Conflict(f"Batch {batch.pk} is {batch.status}: it cannot be cancelled.", code="batch_not_cancellable")
        return Response(batch.as_openai(progress.counts(batch)))
