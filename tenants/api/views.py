"""``/tenants``: tenants, their members and their API keys, for operators.

Every call needs a model permission, reads included (``tenants.view_tenant``, ...): a tenant's limits
and members are no client's business, and the staff flag alone allows nothing. Writes go through the
audited services (:mod:`tenants.services`).
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from routing.api.views import AuditedWritesMixin
from tenants import keys, services
from tenants.api.serializers import (
    AddMemberSerializer,
    ApiKeySerializer,
    MemberSerializer,
    NewApiKeySerializer,
    TenantSerializer,
)
from tenants.models import ApiKey, Membership, Tenant


class TenantPermissions(permissions.DjangoModelPermissions):
    """Each method needs its model permission, GET included (``view``). The nested routes name
    theirs in the view's ``action_permissions``: ``{(action, method): [perm, ...]}``."""

    perms_map = {
        **permissions.DjangoModelPermissions.perms_map,
        "GET": ["%(app_label)s.view_%(model_name)s"],
        "HEAD": ["%(app_label)s.view_%(model_name)s"],
        "OPTIONS": ["%(app_label)s.view_%(model_name)s"],
    }

    def has_permission(self, request: Request, view) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        needed = getattr(view, "action_permissions", {}).get((getattr(view, "action", None), request.method))
        if needed is not None:
            return request.user.has_perms(needed)
        return super().has_permission(request, view)


MEMBER = OpenApiParameter("member", str, OpenApiParameter.PATH, description="The member's username or user id.")
KEY_ID = OpenApiParameter("key_id", int, OpenApiParameter.PATH, description="The key's id.")


class TenantViewSet(AuditedWritesMixin, viewsets.ModelViewSet):
    """Tenants with their limits; ``members`` and ``keys`` below each one."""

    service = services
    queryset = Tenant.objects.all()
    serializer_class = TenantSerializer
    permission_classes = [TenantPermissions]
    lookup_value_regex = r"\d{1,18}"
    action_permissions = {
        ("members", "GET"): ["tenants.view_tenant", "tenants.view_membership"],
        ("members", "POST"): ["tenants.view_tenant", "tenants.add_membership", "tenants.change_membership"],
        ("member", "DELETE"): ["tenants.view_tenant", "tenants.delete_membership"],
        ("keys", "GET"): ["tenants.view_tenant", "tenants.view_apikey"],
        ("keys", "POST"): ["tenants.view_tenant", "tenants.add_apikey"],
        ("key", "DELETE"): ["tenants.view_tenant", "tenants.change_apikey"],
    }

    def perform_destroy(self, instance: Tenant) -> None:
        services.delete(instance, user=self.request.user, source="api")

    # --- members ---------------------------------------------------------------------------------
    @extend_schema(methods=["GET"], request=None, responses=MemberSerializer(many=True), summary="The tenant's members")
    @extend_schema(
        methods=["POST"],
        request=AddMemberSerializer,
        responses={
            201: MemberSerializer,
            200: OpenApiResponse(MemberSerializer, description="The user already was a member."),
            409: OpenApiResponse(description='The user belongs to another tenant (send "move": true).'),
        },
        summary="Add a user to the tenant (a user belongs to at most one)",
    )
    @action(detail=True, methods=["get", "post"], pagination_class=None)
    def members(self, request: Request, pk: str | None = None) -> Response:
        tenant = self.get_object()
        if request.method == "GET":
            rows = tenant.memberships.select_related("user").order_by("user__username")
            return Response(MemberSerializer(rows, many=True).data)
        body = AddMemberSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        username = body.validated_data["username"]
        member = get_user_model().objects.filter(username=username).first()
        if member is None:
            raise ValidationError({"username": [f"No user named {username!r}."]})
        if keys.is_service_user(member):
            raise ValidationError({"username": [f"{username!r} is a tenant's service user, not a person."]})
        try:
            membership, created = services.add_member(
                tenant, member, move=body.validated_data["move"], user=request.user, source="api"
            )
        except services.MemberOfAnotherTenant as exc:
            return Response({"detail": str(exc), "tenant": exc.tenant.name}, status=status.HTTP_409_CONFLICT)
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(MemberSerializer(membership).data, status=code)

    @extend_schema(request=None, responses={204: None}, parameters=[MEMBER], summary="Remove a member")
    @action(detail=True, methods=["delete"], url_path=r"members/(?P<member>[^/]+)", url_name="member")
    def member(self, request: Request, pk: str | None = None, member: str = "") -> Response:
        tenant = self.get_object()
        rows = Membership.objects.select_related("user", "tenant").filter(tenant=tenant)
        found = rows.filter(user__username=member).first()
        if found is None and member.isdigit() and len(member) < 19:
            found = rows.filter(user_id=int(member)).first()
        if found is None:
            raise NotFound(f"{member!r} is not a member of tenant {tenant.name!r}.")
        services.remove_member(found, user=request.user, source="api")
        return Response(status=status.HTTP_204_NO_CONTENT)

    # --- keys ------------------------------------------------------------------------------------
    @extend_schema(
        methods=["GET"], request=None, responses=ApiKeySerializer(many=True), summary="The tenant's API keys"
    )
    @extend_schema(
        methods=["POST"],
        request=NewApiKeySerializer,
        responses={201: NewApiKeySerializer},
        summary="Issue an API key (the key is in this answer only)",
    )
    @action(detail=True, methods=["get", "post"], pagination_class=None)
    def keys(self, request: Request, pk: str | None = None) -> Response:
        tenant = self.get_object()
        if request.method == "GET":
            return Response(ApiKeySerializer(tenant.api_keys.all(), many=True).data)
        body = NewApiKeySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        key, raw = services.issue_key(tenant, body.validated_data["name"], user=request.user, source="api")
        key.key = raw
        return Response(NewApiKeySerializer(key).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={204: None}, parameters=[KEY_ID], summary="Revoke an API key")
    @action(detail=True, methods=["delete"], url_path=r"keys/(?P<key_id>\d+)", url_name="key")
    def key(self, request: Request, pk: str | None = None, key_id: str = "") -> Response:
        tenant = self.get_object()
        if len(key_id) > 18:
            raise NotFound(f"No key {key_id} in tenant {tenant.name!r}.")
        found = get_object_or_404(ApiKey, tenant=tenant, pk=int(key_id))
        services.revoke_key(found, user=request.user, source="api")
        return Response(status=status.HTTP_204_NO_CONTENT)
