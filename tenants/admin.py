"""Operators' tenant pages: each tenant's limits with its members and keys, and the API keys with
issue (the key shown once) and revoke. Every write is audited through :mod:`tenants.services`."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest

from orchestrator_site.admin_actions import RefuseForbiddenActionsMixin
from routing.models import Backend
from tenants import keys, services
from tenants.models import ApiKey, Membership, Tenant
from tenants.usage_admin import USAGE_FIELDS, UsageMixin


class TenantForm(forms.ModelForm):
    """``allowed_backends`` as boxes to tick among the registered backends (plus any stored name that
    no longer exists, so saving does not silently drop it)."""

    allowed_backends = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="Backends its jobs may use; none ticked: all.",
    )

    class Meta:
        model = Tenant
        fields = list(services.AUDITED_FIELDS)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        names = list(Backend.objects.order_by("name").values_list("name", flat=True))
        stored = [n for n in (self.instance.allowed_backends or []) if isinstance(n, str) and n not in names]
        self.fields["allowed_backends"].choices = [(n, n) for n in names] + [
            (n, f"{n} (not registered)") for n in stored
        ]

    def clean_allowed_backends(self) -> list[str]:
        names = list(dict.fromkeys(self.cleaned_data.get("allowed_backends") or []))
        if unknown := services.unknown_backends(names):
            raise forms.ValidationError(f"Unknown backends: {', '.join(unknown)}.")
        return names


class MembershipForm(forms.ModelForm):
    class Meta:
        model = Membership
        fields = ["user"]

    def clean_user(self):
        user = self.cleaned_data["user"]
        other = Membership.objects.select_related("tenant").filter(user=user).exclude(pk=self.instance.pk).first()
        if other is not None and other.tenant_id != self.instance.tenant_id:
            raise forms.ValidationError(
                f"{user.get_username()} belongs to tenant {other.tenant.name!r}; remove them there first "
                "(a user belongs to at most one tenant)."
            )
        if keys.is_service_user(user):
            raise forms.ValidationError("A tenant's service user is not a person; it cannot be a member.")
        return user


class MembershipInline(admin.TabularInline):
    model = Membership
    form = MembershipForm
    extra = 0
    fields = ["user", "created_at"]
    readonly_fields = ["created_at"]
    autocomplete_fields = ["user"]


class ApiKeyInline(admin.TabularInline):
    """Read-only here; issue and revoke on the API keys page (the link on each row)."""

    model = ApiKey
    extra = 0
    can_delete = False
    show_change_link = True
    fields = ["name", "prefix", "created_at", "last_used_at", "revoked_at", "created_by"]
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Tenant)
class TenantAdmin(UsageMixin, RefuseForbiddenActionsMixin, admin.ModelAdmin):
    form = TenantForm
    list_display = [
        "name",
        "enabled",
        "weight",
        "max_priority",
        "rpm_limit",
        "tokens_per_day",
        "budget",
        "max_queued",
        "queue_timeout_s",
        "member_count",
    ]
    list_filter = ["enabled", "max_priority", "budget_period"]
    search_fields = ["name", "description"]
    inlines = [MembershipInline, ApiKeyInline]
    fieldsets = [
        (None, {"fields": ["name", "description", "enabled"]}),
        (
            "Limits (empty: none)",
            {"fields": ["rpm_limit", "tokens_per_day", "budget_usd", "budget_period", "max_queued"]},
        ),
        ("Priority, backends and share", {"fields": ["max_priority", "allowed_backends", "weight", "queue_timeout_s"]}),
    ]

    def get_fieldsets(self, request: HttpRequest, obj: Tenant | None = None) -> list:
        fieldsets = list(super().get_fieldsets(request, obj))
        if obj is not None:  # a tenant being created has no usage yet
            fieldsets.append(("Usage (today / this budget period)", {"fields": list(USAGE_FIELDS)}))
        return fieldsets

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        return super().get_queryset(request).annotate(_members=Count("memberships"))

    @admin.display(description="members", ordering="_members")
    def member_count(self, obj: Tenant) -> int:
        return getattr(obj, "_members", 0)

    @admin.display(description="budget")
    def budget(self, obj: Tenant) -> str:
        return "—" if obj.budget_usd is None else f"${obj.budget_usd.normalize():f} / {obj.budget_period}"

    # --- audited writes ---------------------------------------------------------------------------
    def save_model(self, request: HttpRequest, obj: Tenant, form, change: bool) -> None:
        services.save(obj, user=request.user, source="admin")

    def delete_model(self, request: HttpRequest, obj: Tenant) -> None:
        services.delete(obj, user=request.user, source="admin")

    def delete_queryset(self, request: HttpRequest, queryset) -> None:
        for obj in queryset:
            services.delete(obj, user=request.user, source="admin")

    def save_formset(self, request: HttpRequest, form, formset, change: bool) -> None:
        if formset.model is not Membership:
            super().save_formset(request, form, formset, change)
            return
        formset.save(commit=False)  # fills deleted_objects, new_objects, changed_objects
        for membership in formset.deleted_objects:
            services.remove_member(membership, user=request.user, source="admin")
        for membership, _fields in formset.changed_objects:  # another user on the row: out, then in
            services.remove_member(Membership.objects.get(pk=membership.pk), user=request.user, source="admin")
        new = formset.new_objects + [m for m, _ in formset.changed_objects]
        for membership in new:
            services.add_member(form.instance, membership.user, user=request.user, source="admin")


class ApiKeyAddForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ["tenant", "name"]


@admin.register(ApiKey)
class ApiKeyAdmin(RefuseForbiddenActionsMixin, admin.ModelAdmin):
    """Keys are issued here (the key is shown once, in the message after saving) and revoked with
    the action; never edited or deleted, so the list keeps who had access and until when."""

    list_display = ["name", "tenant", "prefix", "created_at", "last_used_at", "revoked_at", "created_by"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "tenant"]
    list_select_related = ["tenant", "created_by"]
    search_fields = ["name", "prefix", "tenant__name"]
    autocomplete_fields = ["tenant"]
    actions = ["revoke_keys"]
    fields = ["tenant", "name", "prefix", "created_at", "created_by", "last_used_at", "revoked_at"]

    def get_form(self, request: HttpRequest, obj=None, change: bool = False, **kwargs):
        if obj is None:
            kwargs["form"] = ApiKeyAddForm
            kwargs["fields"] = ["tenant", "name"]
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fields(self, request: HttpRequest, obj=None) -> list[str]:
        return ["tenant", "name"] if obj is None else self.fields

    def get_readonly_fields(self, request: HttpRequest, obj=None) -> list[str]:
        return [] if obj is None else list(self.fields)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def render_change_form(self, request: HttpRequest, context, add=False, change=False, form_url="", obj=None):
        if not add:  # every field is read-only: revoking is the list action
            context.update(show_save=False, show_save_and_continue=False, show_save_and_add_another=False)
        return super().render_change_form(request, context, add, change, form_url, obj)

    def save_model(self, request: HttpRequest, obj: ApiKey, form, change: bool) -> None:
        if change:
            return  # nothing on a key is edited
        issued, raw = services.issue_key(obj.tenant, obj.name, user=request.user, source="admin")
        for field in ApiKey._meta.concrete_fields:
            setattr(obj, field.attname, getattr(issued, field.attname))
        obj._state.adding = False
        obj._state.db = issued._state.db
        self.message_user(
            request,
            f"The key for {obj.tenant.name} (shown this once; copy it now, only its hash is stored): {raw}",
            messages.WARNING,
        )

    @admin.action(description="Revoke selected API keys (they answer 401 from then on)", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = sum(services.revoke_key(key, user=request.user, source="admin") for key in queryset)
        skipped = len(queryset) - revoked
        text = f"Revoked {revoked} key(s)."
        if skipped:
            text += f" Skipped {skipped} already revoked."
        self.message_user(request, text, messages.SUCCESS if revoked else messages.WARNING)
