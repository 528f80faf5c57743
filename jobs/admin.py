"""Operators' job pages: the list with filters and bulk actions, and each job's timeline
(created → routed → every attempt → final state) on its change page."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import wraps
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern
from django_rq.admin import QueueAdmin
from django_rq.models import Dashboard as RQDashboard
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from audit import log as audit_log
from jobs import queue_position, queueing
from jobs.models import ACTIVE_STATES, Job, JobAttempt, JobState
from orchestrator_site.admin_actions import RefuseForbiddenActionsMixin
from orchestrator_site.redis import redis_client

RETRYABLE_STATES = frozenset({JobState.FAILED, JobState.CANCELED, JobState.EXPIRED})  # what Job.requeue accepts


class JobAttemptInline(admin.TabularInline):
    model = JobAttempt
    extra = 0
    can_delete = False
    fields = ["number", "backend_name", "worker", "outcome", "started_at", "finished_at", "latency_ms", "error"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(RefuseForbiddenActionsMixin, admin.ModelAdmin):
    """Jobs are read-only here: they change only through their state machine (the actions), which
    need the change permission and are written to the audit log, one entry per job moved."""

    list_display = [
        "id",
        "state",
        "priority",
        "tenant",
        "backend_name",
        "policy_name",
        "created_at",
        "latency_ms",
        "attempt_count",
    ]
    list_filter = ["state", "priority", "tenant", "backend_name", "policy_name"]
    search_fields = ["=id", "prompt"]
    date_hierarchy = "created_at"
    list_select_related = ["tenant"]
    show_full_result_count = False
    actions = ["cancel_jobs", "retry_jobs"]
    inlines = [JobAttemptInline]
    fieldsets = [
        (None, {"fields": ["id", "state", "priority", "created_by", "tenant", "batch", "custom_id", "error"]}),
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
        (
            "Result",
            {
                "fields": [
                    "output",
                    "tool_calls",
                    "finish_reason",
                    "prompt_tokens",
                    "completion_tokens",
                    "cost",
                    "latency_ms",
                ]
            },
        ),
        ("Routing", {"fields": ["backend_name", "policy_name", "policy_version", "routing", "queue", "queue_place"]}),
        (
            "Timings",
            {
                "fields": [
                    "created_at",
                    "enqueued_at",
                    "queue_timeout_s",
                    "expires_at",
                    "started_at",
                    "finished_at",
                    "attempt_count",
                    "worker",
                ]
            },
        ),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj=None) -> list[str]:
        # Jobs change only through their state machine (actions below), never by hand.
        return [f.name for f in Job._meta.fields] + ["created_by", "queue_place"]

    @admin.display(description="Queue position")
    def queue_place(self, obj: Job) -> str:
        """While queued: its place among the jobs the workers would take, and when it should start."""
        if obj.state != JobState.QUEUED or not obj.queue:
            return "—"
        place = queue_position.place(obj.queue, obj.tenant_id, obj.rq_job_id or str(obj.pk))
        if place.position is None and obj.batch_id is not None and obj.enqueued_at is None:
            held = queue_position.held_place(str(obj.pk))
            if held.position is not None:
                return f"{held.position} (held by its batch's window until earlier lines end)"
        if place.position is None:
            return "not on its queue (the reconciler will push it again)"
        eta = f", starts in about {place.eta_s:g} s" if place.eta_s is not None else ", no drain rate measured yet"
        return f"{place.position}{eta}"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def render_change_form(
        self, request: HttpRequest, context: dict[str, Any], add=False, change=False, form_url="", obj=None
    ) -> HttpResponse:
        # jobs/templates/admin/jobs/job/change_form.html draws it above the field sets.
        if obj is not None:
            context["timeline"] = build_timeline(obj)
        # Every field is read-only: a Save button would only bump updated_at and confuse.
        context.update(show_save=False, show_save_and_continue=False, show_save_and_add_another=False)
        return super().render_change_form(request, context, add, change, form_url, obj)

    # --- bulk actions: every change goes through a Job method, whose CAS decides ------------------
    @admin.action(description="Cancel selected jobs (only queued or running ones)", permissions=["change"])
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        selected = list(queryset)
        canceled = 0
        for job in selected:
            if job.state not in ACTIVE_STATES:
                continue
            was = job.state
            with transaction.atomic():
                # cancel() is a compare-and-set: a job that finished since the page was drawn is skipped, not clobbered.
                if job.cancel():
                    canceled += 1
                    _audit(request, job, "cancel", was)
        skipped = len(selected) - canceled
        text = f"Canceled {canceled} job(s)."
        if skipped:
            text += f" Skipped {skipped} that were no longer queued or running."
        self.message_user(request, text, messages.SUCCESS if canceled else messages.WARNING)

    @admin.action(
        description="Retry selected failed/canceled jobs (re-queued on their backend)", permissions=["change"]
    )
    def retry_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        selected = list(queryset)
        retried = 0
        for job in selected:
            if job.state not in RETRYABLE_STATES:
                continue
            was = job.state
            with transaction.atomic():
                if job.requeue():
                    retried += 1
                    _audit(request, job, "retry", was)
                    # Enqueue only once the row says `queued`, or a fast worker would find it still failed.
                    transaction.on_commit(lambda job=job: queueing.enqueue(job))
        skipped = len(selected) - retried
        text = f"Re-queued {retried} job(s)."
        if skipped:
            text += f" Skipped {skipped} that were not failed or canceled."
        self.message_user(request, text, messages.SUCCESS if retried else messages.WARNING)


def _audit(request: HttpRequest, job: Job, action: str, was: str) -> None:
    """One audit entry for a job an operator moved; inside the transaction that moved it."""
    audit_log.record(
        job, action, user=request.user, source="admin", changes={"state": [was, job.state]}, name=str(job.pk)
    )


# --- django-rq's queue pages ---------------------------------------------------------------------------
class QueueAdminNeedingChangeJob(QueueAdmin):
    """django-rq's pages check the staff flag only, yet their POSTs delete, re-queue and stop jobs and
    empty whole queues: those need ``jobs.change_job``, like the job actions. Looking stays open to staff."""

    def get_urls(self) -> list:
        return [_post_needs(p, "jobs.change_job") if isinstance(p, URLPattern) else p for p in super().get_urls()]


def _post_needs(pattern: URLPattern, perm: str) -> URLPattern:
    view = pattern.callback

    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method == "POST" and not request.user.has_perm(perm):
            raise PermissionDenied
        return view(request, *args, **kwargs)

    return URLPattern(pattern.pattern, guarded, pattern.default_args, pattern.name)


if admin.site.is_registered(RQDashboard):  # RQ_SHOW_ADMIN_LINK: django-rq registered its own
    admin.site.unregister(RQDashboard)
    admin.site.register(RQDashboard, QueueAdminNeedingChangeJob)


# --- the timeline ---------------------------------------------------------------------------------------
@dataclass
class Candidate:
    backend: str
    score: str
    reason: str
    chosen: bool


def build_timeline(job: Job) -> dict[str, Any]:
    """What the change page's timeline shows; plain values only, the template escapes them all.

    ``job.routing`` is the stored decision (``routing.services.Decision.as_json``); rows written
    before that format, or by hand, may lack any key, so every read here tolerates absence.
    """
    decision = job.routing if isinstance(job.routing, dict) else {}
    chosen = str(decision.get("backend") or job.backend_name or "")
    candidates = [
        Candidate(
            backend=str(c.get("backend", "")),
            score=_score(c.get("score")),
            reason=str(c.get("reason", "")),
            chosen=c.get("backend") == chosen,
        )
        for c in decision.get("candidates") or []
        if isinstance(c, dict)
    ]
    rejected = decision.get("rejected") if isinstance(decision.get("rejected"), dict) else {}
    usage_known = job.prompt_tokens is not None or job.completion_tokens is not None
    return {
        "routed": bool(decision) or bool(job.policy_name),
        "policy": decision.get("policy") or job.policy_name,
        "policy_version": decision.get("policy_version") or job.policy_version,
        "chosen": chosen,
        "reason": str(decision.get("reason", "")),
        "candidates": candidates,
        "rejected": sorted((str(k), str(v)) for k, v in rejected.items()),
        "attempts": list(job.attempts.order_by("number")),
        "final": job.is_terminal,
        "total_tokens": (job.prompt_tokens or 0) + (job.completion_tokens or 0) if usage_known else None,
        "cost": _cost(job.cost),
        "trace_id": trace_id(job),
        "tool_calls": tool_calls(job),
    }


def tool_calls(job: Job) -> list[tuple[str, str, str]]:
    """The calls the model asked for, as (id, function name, arguments), tolerating hand-written rows."""
    out = []
    for call in job.tool_calls if isinstance(job.tool_calls, list) else []:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            out.append((str(call.get("id", "")), str(fn.get("name", "")), str(fn.get("arguments", ""))))
    return out


def trace_id(job: Job) -> str:
    """The trace id of the submitting request; '' when tracing was off.

    Stored on the row at submission; jobs submitted before that column existed fall back to the
    ``traceparent`` their RQ job carried, while that RQ job still exists (one Redis read).
    """
    if job.trace_id:
        return job.trace_id
    if not job.rq_job_id:
        return ""
    try:
        meta = RQJob.fetch(job.rq_job_id, connection=redis_client(), serializer=JSONSerializer).meta
    except (NoSuchJobError, RedisError, ValueError):
        return ""
    parts = str(meta.get("traceparent", "")).split("-")  # version-trace_id-span_id-flags
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def _score(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int | float):
        return f"{value:.4g}"
    return str(value)


def _cost(value: Decimal | None) -> str:
    return "—" if value is None else f"{value.normalize():f}"
