"""The dashboard page, the HTML fragment its script swaps in every few seconds, and the same figures as JSON.

All three are mounted on the admin site by :mod:`dashboard.admin` behind ``AdminSite.admin_view``:
staff only, never cached.
"""

from __future__ import annotations

from django.contrib.admin import AdminSite
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse

from dashboard.snapshot import as_json, collect

REFRESH_MS = 2500
FRAGMENT_HEADER = "X-Dashboard-Fragment"  # the script swaps in only responses that carry it (not a login page)


def dashboard(request: HttpRequest, site: AdminSite) -> HttpResponse:
    """The whole page, server-rendered: every figure is readable with JavaScript off."""
    request.current_app = site.name
    context = {
        **site.each_context(request),
        "title": "Live dashboard",
        "snap": collect(),
        "refresh_ms": REFRESH_MS,
    }
    return TemplateResponse(request, "admin/dashboard/dashboard.html", context)


def panels(request: HttpRequest, site: AdminSite) -> HttpResponse:
    """Only the panels (the page's ``#dashboard-panels`` content), for the auto-refresh."""
    request.current_app = site.name
    response = TemplateResponse(request, "admin/dashboard/_panels.html", {"snap": collect()})
    response[FRAGMENT_HEADER] = "1"
    return response


def data(request: HttpRequest, site: AdminSite) -> JsonResponse:
    """The same figures as plain JSON, for scripts."""
    request.current_app = site.name
    return JsonResponse(as_json(collect()))
