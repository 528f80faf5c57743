"""Operators' batch pages: progress, counts and status in the list, a cancel action through the
batch's state machine, and downloads of its files through an admin view that checks permission
(never a public media URL)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.http import FileResponse, Http404, HttpRequest
from django.urls import path, reverse
from django.utils.html import format_html

from audit import log as audit_log
from batches import cancelling, progress
from batches.models import Batch, File, files_storage


def _download_link(file_id: str | None) -> str:
    if not file_id:
        return "—"
    return format_html('<a href="{}">{}</a>', reverse("admin:batches_file_download", args=[file_id]), file_id)


@admin.register(File)
class FileAdmin(admin.ModelAdmin):
    """Files are written by the API and the finalizer only; here they are read and downloaded."""

    list_display = ["id", "filename", "purpose", "bytes", "tenant", "created_by", "created_at", "download"]
    list_filter = ["purpose", "tenant"]
    search_fields = ["=id", "filename"]
    list_select_related = ["tenant", "created_by"]
    readonly_fields = ["id", "filename", "purpose", "bytes", "blob", "tenant", "created_by", "created_at", "download"]
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="Contents")
    def download(self, obj: File) -> str:
        return _download_link(obj.pk)

    def get_urls(self) -> list:
        view = self.admin_site.admin_view(self.download_view)
        return [path("<str:file_id>/download/", view, name="batches_file_download"), *super().get_urls()]

    def download_view(self, request: HttpRequest, file_id: str) -> FileResponse:
        """A file's bytes, for a user who may view files (the admin's own check, not a public URL)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        file = File.objects.filter(pk=file_id).first()
        if file is None:
            raise Http404(f"No file {file_id}")
        try:
            stream = files_storage().open(file.blob, "rb")
        except OSError:
            raise Http404(f"The contents of {file_id} are gone") from None
        return FileResponse(stream, as_attachment=True, filename=file.filename)


@admin.register(Batch)
class BatchAdmin(admin.ModelAdmin):
    """Batches change only through their state machine: the cancel action, the workers' tasks."""

    list_display = ["id", "status", "progress_bar", "counts", "priority", "tenant", "created_at", "expires_at"]
    list_filter = ["status", "priority", "tenant"]
    search_fields = ["=id", "=input_file__id"]
    list_select_related = ["tenant"]
    date_hierarchy = "created_at"
    actions = ["cancel_batches"]
    fields = [
        "id",
        "status",
        "progress_bar",
        "counts",
        "priority",
        "endpoint",
        "completion_window",
        "metadata",
        "created_by",
        "tenant",
        "input_download",
        "output_download",
        "error_download",
        "errors",
        "total",
        "lines_created",
        "prompt_tokens",
        "completion_tokens",
        "created_at",
        "in_progress_at",
        "expires_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="Counts")
    def counts(self, obj: Batch) -> str:
        c = progress.counts(obj)
        return f"{c['completed']} ok, {c['failed']} failed of {c['total']}"

    @admin.display(description="Progress")
    def progress_bar(self, obj: Batch) -> str:
        c = progress.counts(obj)
        done = c["completed"] + c["failed"]
        percent = int(100 * done / c["total"]) if c["total"] else (100 if obj.is_final else 0)
        return format_html(
            '<progress value="{}" max="100" title="{} of {}"></progress> {}%', percent, done, c["total"], percent
        )

    @admin.display(description="Input file")
    def input_download(self, obj: Batch) -> str:
        return _download_link(obj.input_file_id)

    @admin.display(description="Output file")
    def output_download(self, obj: Batch) -> str:
        return _download_link(obj.output_file_id)

    @admin.display(description="Error file")
    def error_download(self, obj: Batch) -> str:
        return _download_link(obj.error_file_id)

    @admin.action(description="Cancel selected batches", permissions=["change"])
    def cancel_batches(self, request: HttpRequest, queryset: QuerySet[Batch]) -> None:
        moved = 0
        for batch in queryset:
            with transaction.atomic():
                if cancelling.request_cancel(batch):
                    audit_log.record(batch, "cancel", user=request.user, source="admin")
                    moved += 1
        self.message_user(request, f"{moved} batch(es) cancelling.", messages.SUCCESS if moved else messages.WARNING)
