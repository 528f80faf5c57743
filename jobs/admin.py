from __future__ import annotations

from django.contrib import admin, messages
from django.db import transaction
from django.http import HttpRequest

from jobs import queueing
from jobs.models import Job, JobAttempt, JobState


class JobAttemptInline(admin.TabularInline):
    model = JobAttempt
    extra = 0
    can_delete = False
    fields = ["number", "backend_name", "worker", "outcome", "started_at", "finished_at", "latency_ms", "error"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "state",
        "priority",
        "backend_name",
        "policy_name",
        "created_at",
        "latency_ms",
        "attempt_count",
    ]
    list_filter = ["state", "priority", "backend_name", "policy_name"]
    search_fields = ["=id", "prompt"]
    date_hierarchy = "created_at"
    list_select_related = False
    show_full_result_count = False
    actions = ["cancel_jobs", "retry_jobs"]
    inlines = [JobAttemptInline]
    fieldsets = [
        (None, {"fields": ["id", "state", "priority", "created_by", "error"]}),
        (
            "Request",
            {
                "fields": [
                    "prompt",
                    "messages",
                    "model",
                    "requested_backend",
                    "requires_multimodal",
                    "max_tokens",
                    "temperature",
                    "params",
                    "metadata",
                    "timeout_s",
                    "idempotency_key",
                ]
            },
        ),
        ("Result", {"fields": ["output", "finish_reason", "prompt_tokens", "completion_tokens", "cost", "latency_ms"]}),
        ("Routing", {"fields": ["backend_name", "policy_name", "policy_version", "routing", "queue"]}),
        ("Timings", {"fields": ["created_at", "enqueued_at", "started_at", "finished_at", "attempt_count", "worker"]}),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj=None) -> list[str]:
        # Jobs change only through their state machine (actions below), never by hand.
        return [f.name for f in Job._meta.fields] + ["created_by"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Cancel selected queued/running jobs")
    def cancel_jobs(self, request: HttpRequest, queryset) -> None:
        done = sum(1 for job in queryset.filter(state__in=[JobState.QUEUED, JobState.RUNNING]) if job.cancel())
        skipped = queryset.count() - done
        self.message_user(
            request,
            f"Canceled {done} job(s); {skipped} were not queued or running.",
            messages.SUCCESS if done else messages.WARNING,
        )

    @admin.action(description="Retry selected failed/canceled jobs")
    def retry_jobs(self, request: HttpRequest, queryset) -> None:
        done = 0
        for job in queryset.filter(state__in=[JobState.FAILED, JobState.CANCELED]):
            with transaction.atomic():
                if job.requeue():
                    done += 1
                    transaction.on_commit(lambda job=job: queueing.enqueue(job))
        self.message_user(request, f"Re-queued {done} job(s).", messages.SUCCESS if done else messages.WARNING)
