from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SpectacularAPIView
from rest_framework.decorators import api_view, permission_classes
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from orchestrator_site.api_docs import Redoc, SwaggerUI
from orchestrator_site.health import healthz, readyz
from orchestrator_site.metrics import metrics_view


@extend_schema(
    responses={200: {"type": "object", "additionalProperties": {"type": "string", "format": "uri"}}},
    summary="The main addresses",
)
@api_view(["GET"])
@permission_classes([AllowAny])
def api_root(request: Request) -> Response:
    """LLM Orchestrator: submit jobs, follow them, manage backends, routing policies and tenants."""
    return Response(
        {
            "jobs": request.build_absolute_uri("/jobs"),
            "backends": request.build_absolute_uri("/backends"),
            "policies": request.build_absolute_uri("/policies"),
            "tenants": request.build_absolute_uri("/tenants"),
            "webhooks": request.build_absolute_uri("/webhooks"),
            "schema": request.build_absolute_uri("/api/schema"),
            "docs": request.build_absolute_uri("/api/docs"),
            "redoc": request.build_absolute_uri("/api/redoc"),
            "admin": request.build_absolute_uri("/admin/"),
            "health": request.build_absolute_uri("/healthz"),
            "ready": request.build_absolute_uri("/readyz"),
            "metrics": request.build_absolute_uri("/metrics"),
            "openai": request.build_absolute_uri("/v1"),
        }
    )


urlpatterns = [
    path("", api_root, name="api-root"),
    path("admin/", admin.site.urls),
    path("api-auth/", include("rest_framework.urls")),
    re_path(r"^api/schema/?$", SpectacularAPIView.as_view(), name="schema"),
    re_path(r"^api/docs/?$", SwaggerUI.as_view(), name="api-docs"),
    re_path(r"^api/(?:docs/)?redoc/?$", Redoc.as_view(), name="api-redoc"),
    re_path(r"^healthz/?$", healthz, name="healthz"),
    re_path(r"^readyz/?$", readyz, name="readyz"),
    re_path(r"^metrics/?$", metrics_view, name="metrics"),
    path("", include("jobs.api.urls")),
    path("", include("routing.api.urls")),
    path("", include("tenants.api.urls")),
    path("", include("batches.api.urls")),  # before openai_api's catch-all for unknown /v1 paths
    path("", include("openai_api.api.urls")),
    path("", include("webhooks.api.urls")),
]

# A path no view matches answers JSON like the API's own 404s (the admin keeps its HTML page).
handler404 = "orchestrator_site.api.not_found"
