"""``/backends`` and ``/policies``: the registry and the routing policies.

Every authenticated user reads them (client programs see a summary of the enabled backends);
writes need the matching model permission (``routing.add_backend``, ``routing.change_routingpolicy``,
...), not the staff flag, and go through the audited services (:mod:`routing.backends`,
:mod:`routing.policies`).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from routing import backends, policies
from routing.api.serializers import BackendSerializer, BackendSummarySerializer, RoutingPolicySerializer
from routing.models import Backend, RoutingPolicy


class ModelPermissionsOrReadOnly(permissions.DjangoModelPermissions):
    """Reads for any authenticated user; each write needs its model permission (POST add, PUT/PATCH
    change, DELETE delete). A custom action names its own in the view's ``action_permissions``."""

    def has_permission(self, request: Request, view) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        needed = getattr(view, "action_permissions", {}).get(getattr(view, "action", None))
        if needed is not None:
            return request.user.has_perms(needed)
        return super().has_permission(request, view)


FULL_BACKEND_VIEW = ("routing.view_backend", "routing.change_backend")


def sees_full_registry(user) -> bool:
    """Operators (view or change permission on backends) see every backend and every setting."""
    return any(user.has_perm(perm) for perm in FULL_BACKEND_VIEW)


class AuditedWritesMixin:
    """Creates and updates go through the model's write service (``service.save``), which writes the
    audit entry in the same transaction: the API never saves a registry row by itself."""

    service: Any  # a module with ``save(obj, *, user, source)``

    def perform_create(self, serializer: serializers.ModelSerializer) -> None:
        obj = serializer.Meta.model(**serializer.validated_data)
        self.service.save(obj, user=self.request.user, source="api")
        serializer.instance = obj

    def perform_update(self, serializer: serializers.ModelSerializer) -> None:
        obj = serializer.instance
        for name, value in serializer.validated_data.items():
            setattr(obj, name, value)
        self.service.save(obj, user=self.request.user, source="api")


@extend_schema_view(
    list=extend_schema(
        responses=BackendSummarySerializer(many=True),
        description="Enabled backends, summarised. Holders of routing.view_backend get every backend, in full.",
    ),
    retrieve=extend_schema(
        responses=BackendSummarySerializer,
        description="A summary of an enabled backend. Holders of routing.view_backend get the full record.",
    ),
)
class BackendViewSet(AuditedWritesMixin, viewsets.ModelViewSet):
    service = backends
    queryset = Backend.objects.all()
    serializer_class = BackendSerializer
    permission_classes = [ModelPermissionsOrReadOnly]

    def _summary_only(self) -> bool:
        if getattr(self, "swagger_fake_view", False):  # schema generation: the documented (full) form
            return False
        return self.request.method in permissions.SAFE_METHODS and not sees_full_registry(self.request.user)

    def get_queryset(self):
        # A client can pin a job only to an enabled backend; disabled ones are none of its business.
        return Backend.objects.filter(enabled=True) if self._summary_only() else Backend.objects.all()

    def get_serializer_class(self):
        return BackendSummarySerializer if self._summary_only() else BackendSerializer

    def perform_destroy(self, instance: Backend) -> None:
        backends.delete(instance, user=self.request.user, source="api")


class RoutingPolicyViewSet(AuditedWritesMixin, viewsets.ModelViewSet):
    """Policies; every write is kept in the audit log (``routing.PolicyChange``) with its user."""

    service = policies

    queryset = RoutingPolicy.objects.all()
    serializer_class = RoutingPolicySerializer
    permission_classes = [ModelPermissionsOrReadOnly]
    action_permissions = {"activate": ["routing.change_routingpolicy"]}

    @extend_schema(responses={204: None, 409: OpenApiResponse(description="The policy is the active one.")})
    def destroy(self, request: Request, *args, **kwargs) -> Response:
        try:
            policies.delete(self.get_object(), user=request.user, source="api")
        except policies.ActivePolicyError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses=RoutingPolicySerializer, summary="Make this the active policy")
    @action(detail=True, methods=["post"])
    def activate(self, request: Request, pk: str | None = None) -> Response:
        policy = self.get_object()
        policies.activate(policy, user=request.user, source="api")
        return Response(self.get_serializer(policy).data)
