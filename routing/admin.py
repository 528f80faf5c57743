"""Operators' pages: the backend registry with live figures, policies with audited activation,
a dry-run of a policy over recent jobs, and the read-only audit log."""

from __future__ import annotations

from datetime import UTC, datetime

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from redis.exceptions import RedisError

from audit.admin import ReadOnlyLogAdmin, changes_html, show
from orchestrator_site.admin_actions import RefuseForbiddenActionsMixin
from routing import backends, circuit, policies
from routing.models import Backend, PolicyAction, PolicyChange, RoutingPolicy
from routing.services import read_live_stats
from routing.simulate import DEFAULT_JOBS, simulate
from routing.strategies import BackendStats, strategy_choices


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
        fields = list(backends.AUDITED_FIELDS)  # every field the form edits is audited

    def clean(self):
        cleaned = super().clean()
        if not cleaned.get("api_key") and self.instance.pk and not cleaned.get("clear_api_key"):
            cleaned["api_key"] = self.instance.api_key  # keep the stored key
        if cleaned.get("clear_api_key"):
            cleaned["api_key"] = ""
        return cleaned


@admin.register(Backend)
class BackendAdmin(RefuseForbiddenActionsMixin, admin.ModelAdmin):
    """Every write (the form, delete, each action) is audited through :mod:`routing.backends`;
    each action needs the change permission, not staff alone."""

    form = BackendForm
    list_display = [
        "name",
        "kind",
        "model",
        "enabled",
        "drain",
        "supports_multimodal",
        "max_concurrency",
        "weight",
        "cost_input_per_1k",
        "cost_output_per_1k",
        "api_key_status",
        "pool",
        "live_in_flight",
        "live_ewma",
        "live_p95",
        "live_error_rate",
        "live_circuit",
        "live_last_error",
    ]
    list_filter = ["kind", "enabled", "drain", "supports_multimodal"]
    search_fields = ["name", "model", "base_url"]
    actions = [
        "enable",
        "disable",
        "drain_selected",
        "undrain_selected",
        "close_circuit",
        "probe_now",
        "multimodal_from_server",
    ]
    fieldsets = [
        (None, {"fields": ["name", "kind", "enabled", "drain", "base_url", "model", "api_key", "clear_api_key"]}),
        (
            "Capabilities",
            {"fields": ["supports_multimodal", "max_context_tokens", "max_concurrency", "weight", "timeout_s", "pool"]},
        ),
        ("Cost (per 1k tokens)", {"fields": ["cost_input_per_1k", "cost_output_per_1k"]}),
        ("Kind-specific", {"fields": ["config"]}),
        ("Live figures (from the workers, via Redis)", {"fields": ["live_figures"]}),
        ("Circuit breaker (shared by all workers, via Redis)", {"fields": ["circuit_panel"]}),
    ]
    readonly_fields = ["live_figures", "circuit_panel"]

    # --- live figures: one Redis read per page, not one per cell --------------------------------
    def get_changelist_instance(self, request: HttpRequest):
        cl = super().get_changelist_instance(request)
        rows = list(cl.result_list)  # evaluates the page; the template iterates these same objects
        live = read_live_stats([b.name for b in rows], details=True)
        for b in rows:
            b._live = live.get(b.name, BackendStats())
        return cl

    def _live(self, obj: Backend) -> BackendStats:
        live = getattr(obj, "_live", None)
        if live is None:
            live = obj._live = read_live_stats([obj.name], details=True).get(obj.name, BackendStats())
        return live

    @admin.display(description="in flight")
    def live_in_flight(self, obj: Backend) -> str:
        return f"{self._live(obj).in_flight}/{obj.max_concurrency}"

    @admin.display(description="EWMA ms")
    def live_ewma(self, obj: Backend) -> str:
        return _ms(self._live(obj).ewma_latency_ms)

    @admin.display(description="p95 ms")
    def live_p95(self, obj: Backend) -> str:
        return _ms(self._live(obj).p95_latency_ms)

    @admin.display(description="errors")
    def live_error_rate(self, obj: Backend) -> str:
        live = self._live(obj)
        return f"{live.error_rate:.1%} of {live.calls}" if live.calls else "—"

    @admin.display(description="circuit")
    def live_circuit(self, obj: Backend) -> str:
        return self._live(obj).circuit_state

    @admin.display(description="last error")
    def live_last_error(self, obj: Backend) -> str:
        live = self._live(obj)
        if not live.last_error:
            return "—"
        return f"{_when(live.last_error_at)}: {live.last_error[:80]}"

    @admin.display(description="Now")
    def live_figures(self, obj: Backend | None) -> str:
        if obj is None or obj.pk is None:
            return "—"
        live = self._live(obj)
        rows = [
            ("In flight", f"{live.in_flight} of max {obj.max_concurrency}"),
            ("EWMA latency", _ms(live.ewma_latency_ms)),
            ("p95 latency", _ms(live.p95_latency_ms)),
            ("Error rate", f"{live.error_rate:.1%} over the last {live.calls} calls" if live.calls else "no calls yet"),
            ("Circuit", live.circuit_state),
            ("Last error", f"{_when(live.last_error_at)}: {live.last_error}" if live.last_error else "—"),
        ]
        return format_html("<table>{}</table>", format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows))

    @admin.display(description="Circuit")
    def circuit_panel(self, obj: Backend | None) -> str:
        """State, why it opened, and the recent transitions, newest first."""
        if obj is None or obj.pk is None:
            return "—"
        try:
            c = circuit.status(obj.name)
        except RedisError as exc:
            return f"unavailable: {exc}"
        rows = [("State", c.state), ("Consecutive failures", str(c.failures))]
        if c.state != "closed":
            rows += [
                ("Opened", _when(c.opened_at)),
                ("Cool-down until", _when(c.open_until)),
                ("Reason", c.reason or "—"),
            ]
        history = format_html_join(
            "",
            "<tr><td>{}</td><td>{} → {}</td><td>{}</td></tr>",
            ((_when(t.at), t.from_state, t.to_state, t.reason) for t in c.history),
        )
        return format_html(
            "<table>{}</table><h4>History</h4><table><tr><th>when</th><th>change</th><th>why</th></tr>{}</table>",
            format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows),
            history or format_html("<tr><td colspan=3>{}</td></tr>", "no transitions yet"),
        )

    @admin.display(description="API key")
    def api_key_status(self, obj: Backend) -> str:
        return "set" if obj.has_api_key else "not set"

    # --- audited writes ---------------------------------------------------------------------------
    def save_model(self, request: HttpRequest, obj: Backend, form, change: bool) -> None:
        backends.save(obj, user=request.user, source="admin")

    def delete_model(self, request: HttpRequest, obj: Backend) -> None:
        backends.delete(obj, user=request.user, source="admin")

    def delete_queryset(self, request: HttpRequest, queryset) -> None:
        for obj in queryset:
            backends.delete(obj, user=request.user, source="admin")

    # --- switches: one audited save() per row (it invalidates routing); counts say what moved -------
    def _switch(self, request: HttpRequest, queryset, field: str, value: bool, done: str, already: str) -> None:
        changed = skipped = 0
        for backend in queryset:
            if backends.switch(backend, field, value, user=request.user, source="admin"):
                changed += 1
            else:
                skipped += 1
        text = done.format(n=changed)
        if skipped:
            text += " " + already.format(n=skipped)
        self.message_user(request, text, messages.SUCCESS if changed else messages.WARNING)

    @admin.action(description="Enable selected backends", permissions=["change"])
    def enable(self, request: HttpRequest, queryset) -> None:
        self._switch(request, queryset, "enabled", True, "Enabled {n} backend(s).", "Skipped {n} already enabled.")

    @admin.action(description="Disable selected backends", permissions=["change"])
    def disable(self, request: HttpRequest, queryset) -> None:
        self._switch(request, queryset, "enabled", False, "Disabled {n} backend(s).", "Skipped {n} already disabled.")

    @admin.action(description="Drain selected backends (no new jobs; queued ones finish)", permissions=["change"])
    def drain_selected(self, request: HttpRequest, queryset) -> None:
        self._switch(
            request,
            queryset,
            "drain",
            True,
            "Draining {n} backend(s): routing sends them no new jobs.",
            "Skipped {n} already draining.",
        )

    @admin.action(description="Undrain selected backends", permissions=["change"])
    def undrain_selected(self, request: HttpRequest, queryset) -> None:
        self._switch(
            request,
            queryset,
            "drain",
            False,
            "Undrained {n} backend(s): they take new jobs again.",
            "Skipped {n} that were not draining.",
        )

    @admin.action(
        description="Close the circuit of selected backends (the backend is known to be back)", permissions=["change"]
    )
    def close_circuit(self, request: HttpRequest, queryset) -> None:
        for backend in queryset:
            backends.close_circuit(backend, user=request.user, source="admin")
        self.message_user(request, f"Circuit closed for {len(queryset)} backend(s).")

    @admin.action(description="Probe now (reachable? model there? capabilities)", permissions=["change"])
    def probe_now(self, request: HttpRequest, queryset) -> None:
        """Synchronous, 3 s per backend: an operator's check, so at most 10 backends per click."""
        from workers.backends.health import probe

        levels = {"ok": messages.SUCCESS, "loading": messages.WARNING}
        for backend in queryset[:10]:
            r = probe(backend.adapter_config(), timeout_s=3)
            backends.record_probe(backend, f"{r.status} in {r.latency_ms} ms", user=request.user, source="admin")
            text = f"{backend.name}: {r.status} in {r.latency_ms} ms — {r.detail}"
            if r.models:
                text += f" Models: {', '.join(r.models[:5])}{' …' if len(r.models) > 5 else ''}."
            if r.capabilities:
                text += f" Capabilities: {', '.join(r.capabilities)}."
            self.message_user(request, text, levels.get(r.status, messages.ERROR))

    @admin.action(
        description="Set 'supports multimodal' from the server (Ollama 'vision' capability)", permissions=["change"]
    )
    def multimodal_from_server(self, request: HttpRequest, queryset) -> None:
        from workers.backends.health import supports_multimodal

        for backend in queryset[:10]:
            answer = supports_multimodal(backend.adapter_config(), timeout_s=3)
            if answer is None:
                self.message_user(request, f"{backend.name}: the server cannot tell; unchanged.", messages.WARNING)
                continue
            backends.switch(backend, "supports_multimodal", answer, user=request.user, source="admin")
            self.message_user(request, f"{backend.name}: supports multimodal = {answer}.")


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _when(ts: float | None) -> str:
    return "—" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class RoutingPolicyForm(forms.ModelForm):
    strategy = forms.ChoiceField(choices=strategy_choices)

    class Meta:
        model = RoutingPolicy
        fields = ["name", "strategy", "params", "description"]


@admin.register(RoutingPolicy)
class RoutingPolicyAdmin(RefuseForbiddenActionsMixin, admin.ModelAdmin):
    """Every write is audited (:mod:`routing.policies`); activation goes through a confirmation page
    (or the list action, which leads there) and needs the change permission."""

    form = RoutingPolicyForm
    list_display = ["name", "strategy", "is_active", "version", "updated_at", "activate_link"]
    list_filter = ["is_active", "strategy"]
    readonly_fields = ["is_active", "version", "created_at", "updated_at"]
    actions = ["activate_selected"]
    change_form_template = "admin/routing/routingpolicy/change_form.html"

    def get_urls(self):
        def wrap(view):
            return self.admin_site.admin_view(view)

        return [
            path("<path:object_id>/activate/", wrap(self.activate_view), name="routing_routingpolicy_activate"),
            path("<path:object_id>/simulate/", wrap(self.simulate_view), name="routing_routingpolicy_simulate"),
            *super().get_urls(),
        ]

    @admin.display(description="")
    def activate_link(self, obj: RoutingPolicy) -> str:
        if obj.is_active:
            return "active"
        return format_html('<a href="{}">Activate…</a>', reverse("admin:routing_routingpolicy_activate", args=[obj.pk]))

    # --- audited writes ---------------------------------------------------------------------------
    def save_model(self, request: HttpRequest, obj: RoutingPolicy, form, change: bool) -> None:
        policies.save(obj, user=request.user, source="admin")

    def delete_model(self, request: HttpRequest, obj: RoutingPolicy) -> None:
        try:
            policies.delete(obj, user=request.user, source="admin")
        except policies.ActivePolicyError as exc:
            request._policy_kept = True  # type: ignore[attr-defined]  (read by response_delete)
            self.message_user(request, str(exc), messages.ERROR)

    def response_delete(self, request: HttpRequest, obj_display: str, obj_id) -> HttpResponse:
        if getattr(request, "_policy_kept", False):  # no "deleted successfully" for a policy that was kept
            return HttpResponseRedirect(reverse("admin:routing_routingpolicy_change", args=[obj_id]))
        return super().response_delete(request, obj_display, obj_id)

    def delete_queryset(self, request: HttpRequest, queryset) -> None:
        for obj in queryset:
            try:
                policies.delete(obj, user=request.user, source="admin")
            except policies.ActivePolicyError as exc:
                self.message_user(request, f"{exc} It was kept.", messages.WARNING)

    # --- activation: always through the confirmation page ---------------------------------------
    @admin.action(description="Activate the selected policy (shows what changes first)", permissions=["change"])
    def activate_selected(self, request: HttpRequest, queryset) -> HttpResponse | None:
        """Hands over to the confirmation page; one policy only, since exactly one is ever active."""
        count = queryset.count()
        if count != 1:
            self.message_user(
                request,
                f"Only one policy can be active: select exactly one to activate ({count} were selected). "
                "Nothing was changed.",
                messages.ERROR,
            )
            return None
        return HttpResponseRedirect(reverse("admin:routing_routingpolicy_activate", args=[queryset.get().pk]))

    def _policy_or_404(self, request: HttpRequest, object_id: str) -> RoutingPolicy:
        policy = self.get_object(request, object_id)
        if policy is None:
            raise Http404("No such routing policy.")
        return policy

    def activate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """GET: what will change (settings diff and a dry run over recent jobs). POST ``confirm``: activate.

        The page carries a token of what it showed (this policy's version, the active policy and its
        version); when either moved before the operator confirmed, the page is shown again instead,
        so nobody activates on the strength of a stale comparison.
        """
        policy = self._policy_or_404(request, object_id)
        if not self.has_change_permission(request, policy):
            raise PermissionDenied
        change_url = reverse("admin:routing_routingpolicy_change", args=[policy.pk])
        current = RoutingPolicy.objects.filter(is_active=True).first()
        shown = _comparison_token(policy, current)
        if request.method == "POST" and "confirm" in request.POST:
            if request.POST.get("shown") == shown:
                policies.activate(policy, user=request.user, source="admin")
                self.message_user(request, _activated_message(policy), messages.SUCCESS)
                return HttpResponseRedirect(change_url)
            self.message_user(
                request,
                "The policies changed while you were reading this page; nothing was activated. Review again.",
                messages.WARNING,
            )
        before = policies.policy_state(current) if current else {}
        rows = [
            (field, show(before.get(field)), show(value))
            for field, value in policies.policy_state(policy).items()
            if field not in ("is_active", "version")
        ]
        limit = _limit(request)
        sim = simulate(policy, limit=limit)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Activate routing policy {policy.name!r}?",
            "policy": policy,
            "current": current,
            "rows": rows,
            "already_active": policy.is_active,
            "change_url": change_url,
            "shown": shown,
            "sim": sim,
            "limit": limit,
            "changed_rows": sim.changed[:CONFIRM_CHANGED_ROWS],
            "simulate_url": reverse("admin:routing_routingpolicy_simulate", args=[policy.pk]) + f"?n={limit}",
        }
        return TemplateResponse(request, "admin/routing/routingpolicy/confirm_activation.html", context)

    # --- dry run ----------------------------------------------------------------------------------
    def simulate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Replay this policy over the last N finished jobs; read-only."""
        policy = self._policy_or_404(request, object_id)
        if not self.has_view_permission(request, policy):
            raise PermissionDenied
        limit = _limit(request)
        sim = simulate(policy, limit=limit)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Simulate {policy.name!r} on recent jobs",
            "policy": policy,
            "sim": sim,
            "limit": limit,
            "change_url": reverse("admin:routing_routingpolicy_change", args=[policy.pk]),
        }
        return TemplateResponse(request, "admin/routing/routingpolicy/simulate.html", context)


CONFIRM_CHANGED_ROWS = 20  # the confirmation page lists this many moved jobs; the simulate page lists all


def _limit(request: HttpRequest) -> int:
    """How many recent jobs to replay (``?n=``); simulate() clamps it."""
    try:
        return int(request.GET.get("n", DEFAULT_JOBS))
    except ValueError:
        return DEFAULT_JOBS


def _comparison_token(policy: RoutingPolicy, current: RoutingPolicy | None) -> str:
    """Identifies what the confirmation page compared: any edit or activation bumps a version."""
    now = f"{current.pk}v{current.version}" if current else "none"
    return f"{policy.pk}v{policy.version}:{now}"


def _activated_message(policy: RoutingPolicy) -> str:
    """The success message, linking the audit entry the activation wrote (same version)."""
    entry = (
        PolicyChange.objects.filter(policy=policy, action=PolicyAction.ACTIVATE, version=policy.version)
        .order_by("-at", "-id")
        .first()
    )
    if entry is None:  # cannot happen (policies.activate() writes it in its transaction), but never 500 on a success
        return format_html("Policy <strong>{}</strong> is now active (version {}).", policy.name, policy.version)
    return format_html(
        'Policy <strong>{}</strong> is now active (version {}). Audit entry: <a href="{}">{}</a>.',
        policy.name,
        policy.version,
        reverse("admin:routing_policychange_change", args=[entry.pk]),
        str(entry),
    )


@admin.register(PolicyChange)
class PolicyChangeAdmin(ReadOnlyLogAdmin):
    """The audit log: read-only, newest first."""

    list_display = ["at", "action", "policy_name", "version", "username", "source", "summary"]
    list_filter = ["action", "source"]
    search_fields = ["policy_name", "username"]
    date_hierarchy = "at"
    list_select_related = ["policy"]
    readonly_fields = ["at", "action", "policy", "policy_name", "version", "username", "source", "changes"]
    fields = readonly_fields

    @admin.display(description="what changed")
    def summary(self, obj: PolicyChange) -> str:
        if obj.action == PolicyAction.ACTIVATE:
            return f"active: {obj.before.get('name', '(none)')} → {obj.after.get('name')}"
        diff = policies.changed_fields(obj.before, obj.after)
        return "; ".join(f"{f}: {show(a)} → {show(b)}" for f, a, b in diff)[:200] or "—"

    @admin.display(description="from → to")
    def changes(self, obj: PolicyChange) -> str:
        return changes_html(policies.changed_fields(obj.before, obj.after))
