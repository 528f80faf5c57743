from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.http import HttpRequest

from routing.models import Backend, RoutingPolicy
from routing.strategies import strategy_choices


class BackendForm(forms.ModelForm):
    """The API key is write-only: left blank it keeps the stored key; 'clear' removes it."""

    api_key = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave blank to keep the current key.",
    )
    clear_api_key = forms.BooleanField(required=False, help_text="Remove the stored API key.")

    class Meta:
        model = Backend
        fields = [
            "name",
            "kind",
            "enabled",
            "base_url",
            "model",
            "api_key",
            "supports_multimodal",
            "max_context_tokens",
            "max_concurrency",
            "weight",
            "timeout_s",
            "pool",
            "cost_input_per_1k",
            "cost_output_per_1k",
            "config",
        ]

    def clean(self):
        cleaned = super().clean()
        if not cleaned.get("api_key") and self.instance.pk and not cleaned.get("clear_api_key"):
            cleaned["api_key"] = self.instance.api_key  # keep the stored key
        if cleaned.get("clear_api_key"):
            cleaned["api_key"] = ""
        return cleaned


@admin.register(Backend)
class BackendAdmin(admin.ModelAdmin):
    form = BackendForm
    list_display = [
        "name",
        "kind",
        "model",
        "enabled",
        "supports_multimodal",
        "max_concurrency",
        "weight",
        "cost_input_per_1k",
        "cost_output_per_1k",
        "api_key_status",
        "pool",
    ]
    list_filter = ["kind", "enabled", "supports_multimodal"]
    search_fields = ["name", "model", "base_url"]
    actions = ["enable", "disable"]
    fieldsets = [
        (None, {"fields": ["name", "kind", "enabled", "base_url", "model", "api_key", "clear_api_key"]}),
        (
            "Capabilities",
            {"fields": ["supports_multimodal", "max_context_tokens", "max_concurrency", "weight", "timeout_s", "pool"]},
        ),
        ("Cost (per 1k tokens)", {"fields": ["cost_input_per_1k", "cost_output_per_1k"]}),
        ("Kind-specific", {"fields": ["config"]}),
    ]

    @admin.display(description="API key")
    def api_key_status(self, obj: Backend) -> str:
        return "set" if obj.has_api_key else "not set"

    @admin.action(description="Enable selected backends")
    def enable(self, request: HttpRequest, queryset) -> None:
        for backend in queryset:  # save() per row so routing snapshots are invalidated
            backend.enabled = True
            backend.save(update_fields=["enabled", "updated_at"])

    @admin.action(description="Disable selected backends")
    def disable(self, request: HttpRequest, queryset) -> None:
        for backend in queryset:
            backend.enabled = False
            backend.save(update_fields=["enabled", "updated_at"])


class RoutingPolicyForm(forms.ModelForm):
    strategy = forms.ChoiceField(choices=strategy_choices)

    class Meta:
        model = RoutingPolicy
        fields = ["name", "strategy", "params", "description"]


@admin.register(RoutingPolicy)
class RoutingPolicyAdmin(admin.ModelAdmin):
    form = RoutingPolicyForm
    list_display = ["name", "strategy", "is_active", "version", "updated_at"]
    list_filter = ["is_active", "strategy"]
    readonly_fields = ["is_active", "version", "created_at", "updated_at"]
    actions = ["activate_selected"]

    @admin.action(description="Activate the selected policy")
    def activate_selected(self, request: HttpRequest, queryset) -> None:
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one policy to activate.", messages.ERROR)
            return
        policy = queryset.get()
        with transaction.atomic():
            policy.activate()
        self.message_user(request, f"Policy {policy.name!r} is now active (version {policy.version}).")

    def delete_model(self, request: HttpRequest, obj: RoutingPolicy) -> None:
        if obj.is_active:
            self.message_user(request, "The active policy cannot be deleted.", messages.ERROR)
            return
        super().delete_model(request, obj)
