"""What the OpenAPI schema says of ``/v1/files`` and ``/v1/batches``: OpenAI's ``FileObject``,
``Batch`` and their list pages (the shapes ``batches.models`` answers)."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from orchestrator_site.serializer_fields import RefuseUnknownFields, StrictCharField


class FileObject(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'file'.")
    bytes = serializers.IntegerField()
    created_at = serializers.IntegerField()
    filename = serializers.CharField()
    purpose = serializers.CharField(help_text="batch (uploaded) or batch_output (written by a batch).")
    status = serializers.ChoiceField(choices=["uploaded", "processed", "error"])
    expires_at = serializers.IntegerField(allow_null=True)
    status_details = serializers.CharField(allow_null=True)


class FileList(serializers.Serializer):
    object = serializers.CharField(help_text="Always 'list'.")
    data = FileObject(many=True)
    first_id = serializers.CharField(allow_null=True)
    last_id = serializers.CharField(allow_null=True)
    has_more = serializers.BooleanField()


class FileDeleted(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'file'.")
    deleted = serializers.BooleanField()


class FileUpload(RefuseUnknownFields, serializers.Serializer):
    """The form of ``POST /v1/files`` (checked by the view: any other field is a 400 naming it)."""

    file = serializers.FileField(help_text="A JSONL file: one request per line.")
    purpose = serializers.CharField(help_text="Must be 'batch' (any other is a 400).")


class BatchError(serializers.Serializer):
    code = serializers.CharField(allow_null=True)
    line = serializers.IntegerField(allow_null=True)
    message = serializers.CharField(allow_null=True)
    param = serializers.CharField(allow_null=True)


class BatchErrors(serializers.Serializer):
    object = serializers.CharField()
    data = BatchError(many=True)


class RequestCounts(serializers.Serializer):
    total = serializers.IntegerField()
    completed = serializers.IntegerField()
    failed = serializers.IntegerField()


class InputTokensDetails(serializers.Serializer):
    cached_tokens = serializers.IntegerField()


class OutputTokensDetails(serializers.Serializer):
    reasoning_tokens = serializers.IntegerField()


class BatchUsage(serializers.Serializer):
    input_tokens = serializers.IntegerField()
    input_tokens_details = InputTokensDetails()
    output_tokens = serializers.IntegerField()
    output_tokens_details = OutputTokensDetails()
    total_tokens = serializers.IntegerField()


class BatchObject(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'batch'.")
    endpoint = serializers.CharField()
    errors = BatchErrors(allow_null=True)
    input_file_id = serializers.CharField()
    completion_window = serializers.CharField()
    status = serializers.ChoiceField(
        choices=["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]
    )
    output_file_id = serializers.CharField(allow_null=True)
    error_file_id = serializers.CharField(allow_null=True)
    created_at = serializers.IntegerField()
    in_progress_at = serializers.IntegerField(allow_null=True)
    expires_at = serializers.IntegerField(allow_null=True)
    finalizing_at = serializers.IntegerField(allow_null=True)
    completed_at = serializers.IntegerField(allow_null=True)
    failed_at = serializers.IntegerField(allow_null=True)
    expired_at = serializers.IntegerField(allow_null=True)
    cancelling_at = serializers.IntegerField(allow_null=True)
    cancelled_at = serializers.IntegerField(allow_null=True)
    request_counts = RequestCounts()
    usage = BatchUsage()
    metadata = serializers.DictField(child=serializers.CharField(), allow_null=True)
    priority = serializers.CharField(help_text="Ours: the lines' priority (high, normal or low).")


class BatchList(serializers.Serializer):
    object = serializers.CharField(help_text="Always 'list'.")
    data = BatchObject(many=True)
    first_id = serializers.CharField(allow_null=True)
    last_id = serializers.CharField(allow_null=True)
    has_more = serializers.BooleanField()


class BatchCreate(RefuseUnknownFields, serializers.Serializer):
    """The body of ``POST /v1/batches`` as ``services.create_batch`` checks it (with OpenAI's messages): any
    other field is a 400 naming it (``Unrecognized request argument supplied``)."""

    input_file_id = StrictCharField()
    endpoint = StrictCharField(help_text="Must be /v1/chat/completions.")
    completion_window = StrictCharField(help_text="Must be 24h (BATCH_COMPLETION_WINDOW_S says what that is).")
    metadata = serializers.DictField(
        child=StrictCharField(max_length=512, allow_blank=True), required=False, allow_null=True
    )
    priority = StrictCharField(
        required=False,
        help_text="Ours (OpenAI has none): high, normal or low, within the tenant's max_priority; default low.",
    )


PAGE_PARAMETERS = [
    OpenApiParameter("after", str, description="A cursor: the id of the last object of the previous page."),
    OpenApiParameter("limit", int, description="Objects per page (1 to 100; files: to 10,000). Default 20."),
]
FILE_LIST_PARAMETERS = [
    *PAGE_PARAMETERS,
    OpenApiParameter("order", str, enum=["asc", "desc"], description="By created_at; default desc."),
    OpenApiParameter("purpose", str, description="Only files of this purpose."),
]
CONTENT = {(200, "application/octet-stream"): OpenApiResponse(str, description="The file's bytes (JSONL).")}
