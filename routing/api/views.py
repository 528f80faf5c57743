"""``/backends`` and ``/policies``: the registry and the routing policies (staff may write)."""

from __future__ import annotations

from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from routing.api.serializers import BackendSerializer, RoutingPolicySerializer
from routing.models import Backend, RoutingPolicy


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
    queryset = RoutingPolicy.objects.all()
    serializer_class = RoutingPolicySerializer
    permission_classes = [IsStaffOrReadOnly]

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
        with transaction.atomic():
            policy.activate()
        return Response(self.get_serializer(policy).data)
