"""``/backends`` and ``/policies``: the registry and the routing policies (staff may write)."""

from __future__ import annotations

from django.db import transaction
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from routing import audit
from routing.api.serializers import BackendSerializer, RoutingPolicySerializer
from routing.models import Backend, PolicyAction, RoutingPolicy


class IsStaffOrReadOnly(permissions.BasePermission):
    def has_permission(self, request: Request, view) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        return request.method in permissions.SAFE_METHODS or request.user.is_staff


class BackendViewSet(viewsets.ModelViewSet):
    queryset = Backend.objects.all()
    serializer_class = BackendSerializer
    permission_classes = [IsStaffOrReadOnly]


class RoutingPolicyViewSet(viewsets.ModelViewSet):
    """Policies; every write is kept in the audit log (``routing.PolicyChange``) with its user."""

    queryset = RoutingPolicy.objects.all()
    serializer_class = RoutingPolicySerializer
    permission_classes = [IsStaffOrReadOnly]

    def perform_create(self, serializer) -> None:
        with transaction.atomic():
            policy = serializer.save()
            audit.record(
                policy,
                PolicyAction.CREATE,
                user=self.request.user,
                source="api",
                before={},
                after=audit.policy_state(policy),
            )

    def perform_update(self, serializer) -> None:
        with transaction.atomic():
            before = audit.policy_state(RoutingPolicy.objects.select_for_update().get(pk=serializer.instance.pk))
            policy = serializer.save()
            audit.record(
                policy,
                PolicyAction.UPDATE,
                user=self.request.user,
                source="api",
                before=before,
                after=audit.policy_state(policy),
            )

    def perform_destroy(self, instance: RoutingPolicy) -> None:
        with transaction.atomic():
            audit.record(
                instance,
                PolicyAction.DELETE,
                user=self.request.user,
                source="api",
                before=audit.policy_state(instance),
                after={},
            )
            instance.delete()

    @extend_schema(responses={204: None, 409: OpenApiResponse(description="The policy is the active one.")})
    def destroy(self, request: Request, *args, **kwargs) -> Response:
        policy = self.get_object()
        if policy.is_active:
            return Response(
                {"detail": "The active policy cannot be deleted; activate another policy first."},
                status=status.HTTP_409_CONFLICT,
            )
        return super().destroy(request, *args, **kwargs)

    @extend_schema(request=None, responses=RoutingPolicySerializer, summary="Make this the active policy")
    @action(detail=True, methods=["post"])
    def activate(self, request: Request, pk: str | None = None) -> Response:
        policy = self.get_object()
        policy.activate(by=request.user, source="api")
        return Response(self.get_serializer(policy).data)
