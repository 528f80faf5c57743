"""``/webhooks``: make, list, read and delete webhook endpoints.

Who sees what, as with jobs: a tenant's API key sees the tenant's endpoints (and makes endpoints
that receive all the tenant's events); a user sees the endpoints they made without a tenant (which
receive the events of their own jobs); staff with ``webhooks.view_webhookendpoint`` see every one
(deleting another's needs ``webhooks.delete_webhookendpoint``). Anything else is a 404.
"""

from __future__ import annotations

from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from tenants.models import ApiKey
from webhooks import services
from webhooks.api.serializers import (
    NewWebhookEndpointSerializer,
    WebhookEndpointCreateSerializer,
    WebhookEndpointSerializer,
)
from webhooks.models import WebhookEndpoint

MAX_ENDPOINTS = 20  # per tenant or user: each event fans out to all of them
ID_DIGITS = 18
WEBHOOK_ID = OpenApiParameter("webhook_id", int, OpenApiParameter.PATH, description="The endpoint's id.")
BAD_REQUEST = OpenApiResponse(
    description="Invalid body: each field in error is named, e.g. `url` (not http(s), not a public"
    " address, credentials in it), `events` (unknown event type) or an unknown field."
)
NOT_FOUND = OpenApiResponse(description="No endpoint with this id that the caller may see.")
UNAUTHORIZED = OpenApiResponse(description="No or invalid credentials.")


def _own(request: Request) -> QuerySet[WebhookEndpoint]:
    """The endpoints the caller made: its tenant's for a tenant key, else its own without a tenant."""
    rows = WebhookEndpoint.objects.select_related("tenant")
    if isinstance(request.auth, ApiKey):
        return rows.filter(tenant_id=request.auth.tenant_id)
    return rows.filter(owner=request.user, tenant__isnull=True)


def _may_see_all(request: Request) -> bool:
    user = request.user
    return bool(user.is_staff and user.has_perm("webhooks.view_webhookendpoint"))


def visible(request: Request) -> QuerySet[WebhookEndpoint]:
    return WebhookEndpoint.objects.select_related("tenant") if _may_see_all(request) else _own(request)


def _get(rows: QuerySet[WebhookEndpoint], webhook_id: str) -> WebhookEndpoint:
    if not webhook_id.isdigit() or len(webhook_id) > ID_DIGITS:
        raise NotFound(f"No webhook endpoint {webhook_id!r} (ids are integers).")
    try:
        return rows.get(pk=int(webhook_id))
    except WebhookEndpoint.DoesNotExist:
        raise NotFound(f"No webhook endpoint {webhook_id}.") from None


class WebhookListCreate(APIView):
    @extend_schema(
        request=WebhookEndpointCreateSerializer,
        responses={
            201: NewWebhookEndpointSerializer,
            400: BAD_REQUEST,
            401: UNAUTHORIZED,
        },
        summary="Make a webhook endpoint (its signing secret is in this answer only)",
    )
    def post(self, request: Request) -> Response:
        body = WebhookEndpointCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        tenant = request.auth.tenant if isinstance(request.auth, ApiKey) else None
        if _own(request).count() >= MAX_ENDPOINTS:
            raise ValidationError(
                {"non_field_errors": [f"At most {MAX_ENDPOINTS} webhook endpoints each; delete one first."]}
            )
        endpoint = services.create(
            owner=request.user,
            tenant=tenant,
            url=data["url"],
            events=data["events"],
            description=data["description"],
            enabled=data["enabled"],
            user=request.user,
            source="api",
        )
        headers = {"Location": request.build_absolute_uri(f"/webhooks/{endpoint.pk}")}
        return Response(NewWebhookEndpointSerializer(endpoint).data, status=status.HTTP_201_CREATED, headers=headers)

    @extend_schema(
        responses={200: WebhookEndpointSerializer(many=True), 401: UNAUTHORIZED},
        summary="List the webhook endpoints the caller may see, newest first",
    )
    def get(self, request: Request) -> Response:
        return Response(WebhookEndpointSerializer(visible(request), many=True).data)


class WebhookDetail(APIView):
    @extend_schema(
        parameters=[WEBHOOK_ID],
        responses={200: WebhookEndpointSerializer, 401: UNAUTHORIZED, 404: NOT_FOUND},
        summary="A webhook endpoint (never its secret)",
    )
    def get(self, request: Request, webhook_id: str) -> Response:
        return Response(WebhookEndpointSerializer(_get(visible(request), webhook_id)).data)

    @extend_schema(
        parameters=[WEBHOOK_ID],
        request=None,
        responses={
            204: OpenApiResponse(description="Deleted, with its deliveries (pending ones are not sent)."),
            401: UNAUTHORIZED,
            403: OpenApiResponse(description="Staff who may see but not delete another's endpoint."),
            404: NOT_FOUND,
        },
        summary="Delete a webhook endpoint",
    )
    def delete(self, request: Request, webhook_id: str) -> Response:
        endpoint = _get(visible(request), webhook_id)
        if not _own(request).filter(pk=endpoint.pk).exists() and not request.user.has_perm(
            "webhooks.delete_webhookendpoint"
        ):
            raise PermissionDenied("Deleting another's webhook endpoint needs webhooks.delete_webhookendpoint.")
        services.delete(endpoint, user=request.user, source="api")
        return Response(status=status.HTTP_204_NO_CONTENT)
