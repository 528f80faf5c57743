"""Webhooks in the admin: endpoints (the secret shown once, when made or rotated), and deliveries
with every attempt, filterable by state, event and endpoint, re-sendable. Writes go through the
audited services (:mod:`webhooks.services`)."""

from __future__ import annotations

import json

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from orchestrator_site.admin_actions import RefuseForbiddenActionsMixin
from webhooks import destination, services
from webhooks.models import EventType, WebhookAttempt, WebhookDelivery, WebhookEndpoint


class EndpointForm(forms.ModelForm):
    url = forms.URLField(max_length=2000, assume_scheme="https")
    events = forms.MultipleChoiceField(choices=EventType.choices, widget=forms.CheckboxSelectMultiple)

    class Meta:
        model = WebhookEndpoint
        fields = ["owner", "tenant", "url", "events", "description", "enabled"]

    def clean_url(self) -> str:
        url = self.cleaned_data["url"].strip()
        if problem := destination.url_problem(url):
            raise forms.ValidationError(problem)
        return url


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(RefuseForbiddenActionsMixin, admin.ModelAdmin):
    """An endpoint's secret is shown once, in the message after it is made or rotated; never again."""

    form = EndpointForm
    list_display = ["id", "url", "scope", "event_list", "enabled", "created_at"]
    list_filter = ["enabled", "tenant"]
    list_select_related = ["owner", "tenant"]
    search_fields = ["url", "description", "owner__username", "tenant__name"]
    raw_id_fields = ["owner"]
    autocomplete_fields = ["tenant"]
    readonly_fields = ["disabled_reason", "created_at", "updated_at"]
    actions = ["rotate_secrets"]

    @admin.display(description="receives the events of")
    def scope(self, obj: WebhookEndpoint) -> str:
        return f"tenant {obj.tenant.name}" if obj.tenant_id else f"user {obj.owner.get_username()}"

    @admin.display(description="events")
    def event_list(self, obj: WebhookEndpoint) -> str:
        return ", ".join(obj.events or ())

    def get_changeform_initial_data(self, request: HttpRequest) -> dict:
        return {"owner": request.user.pk, **super().get_changeform_initial_data(request)}

    def save_model(self, request: HttpRequest, obj: WebhookEndpoint, form, change: bool) -> None:
        before = services.state(WebhookEndpoint.objects.get(pk=obj.pk)) if change else {}
        new = not change
        services.save(obj, before, user=request.user, source="admin")
        if new:
            self.message_user(
                request,
                f"The signing secret of endpoint #{obj.pk} (shown this once; copy it now): {obj.secret}",
                messages.WARNING,
            )

    def delete_model(self, request: HttpRequest, obj: WebhookEndpoint) -> None:
        services.delete(obj, user=request.user, source="admin")

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        for endpoint in queryset:
            services.delete(endpoint, user=request.user, source="admin")

    @admin.action(description="Rotate the signing secret (the new one is shown once)", permissions=["change"])
    def rotate_secrets(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        for endpoint in queryset:
            secret = services.rotate_secret(endpoint, user=request.user, source="admin")
            self.message_user(
                request,
                f"The new signing secret of endpoint #{endpoint.pk} (shown this once; copy it now): {secret}",
                messages.WARNING,
            )


class WebhookAttemptInline(admin.TabularInline):
    model = WebhookAttempt
    extra = 0
    can_delete = False
    fields = ["number", "at", "succeeded", "status_code", "latency_ms", "error", "response", "worker"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(RefuseForbiddenActionsMixin, admin.ModelAdmin):
    """Deliveries are read-only; *Resend* sends the selected ones again now (same ``webhook-id``)."""

    list_display = [
        "message_id",
        "event_type",
        "endpoint",
        "state",
        "attempts",
        "last_status",
        "created_at",
        "next_attempt_at",
    ]
    list_filter = ["state", "event_type", "endpoint"]
    list_select_related = ["endpoint"]
    search_fields = ["=message_id", "endpoint__url"]
    date_hierarchy = "created_at"
    show_full_result_count = False
    actions = ["resend"]
    inlines = [WebhookAttemptInline]
    fields = [
        "message_id",
        "endpoint",
        "event_type",
        "state",
        "attempts",
        "next_attempt_at",
        "give_up_at",
        "last_status",
        "last_error",
        "created_at",
        "delivered_at",
        "body",
    ]
    readonly_fields = fields

    @admin.display(description="payload")
    def body(self, obj: WebhookDelivery) -> str:
        try:
            text = json.dumps(json.loads(obj.payload), indent=2)
        except ValueError:
            text = obj.payload
        return format_html("<pre style='white-space: pre-wrap'>{}</pre>", text)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Resend now (same webhook-id, a new retry window)", permissions=["change"])
    def resend(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        count = services.resend(queryset, user=request.user, source="admin")
        self.message_user(request, f"{count} delivery(ies) will be sent again within seconds.", messages.SUCCESS)
