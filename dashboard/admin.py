"""Mounts the dashboard in the admin: ``/admin/dashboard/`` (``admin:dashboard``), linked from the index.

django-rq's pattern gives the page an entry in the app list (an unmanaged model with its ModelAdmin).
The page itself is an admin-site URL rather than a ModelAdmin one, because a ModelAdmin's URLs all
live under ``/admin/<app>/<model>/`` while the dashboard belongs at ``/admin/dashboard/``; prepended to the
site's patterns, it also takes the place of the app's (otherwise empty) index page there.
"""

from __future__ import annotations

from collections.abc import Callable

from django.contrib import admin
from django.contrib.admin import AdminSite
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import URLPattern, URLResolver, path, reverse

from dashboard import views
from dashboard.models import Dashboard


def _is_staff(request: HttpRequest) -> bool:
    user = request.user
    return bool(user.is_active and user.is_staff)


@admin.register(Dashboard)
class DashboardAdmin(admin.ModelAdmin):
    """The app-list entry: viewing it opens the dashboard; there is nothing to add, change or delete."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return _is_staff(request)

    def has_view_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return _is_staff(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
        return HttpResponseRedirect(reverse("admin:dashboard", current_app=self.admin_site.name))

    def get_urls(self) -> list[URLPattern]:
        info = self.opts.app_label, self.opts.model_name
        return [path("", self.admin_site.admin_view(self.changelist_view), name="{}_{}_changelist".format(*info))]


def dashboard_urls(site: AdminSite) -> list[URLPattern]:
    """The page, its refresh fragment and its JSON, each behind the site's staff check."""

    def wrap(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        return site.admin_view(lambda request: view(request, site))

    return [
        path("dashboard/", wrap(views.dashboard), name="dashboard"),
        path("dashboard/panels/", wrap(views.panels), name="dashboard_panels"),
        path("dashboard/data/", wrap(views.data), name="dashboard_data"),
    ]


def mount(site: AdminSite) -> None:
    """Prepend :func:`dashboard_urls` to ``site``'s URLs (once)."""
    if getattr(site, "_dashboard_mounted", False):
        return
    site_urls = site.get_urls

    def get_urls() -> list[URLPattern | URLResolver]:
        return [*dashboard_urls(site), *site_urls()]

    site.get_urls = get_urls  # type: ignore[method-assign]
    site._dashboard_mounted = True  # type: ignore[attr-defined]


mount(admin.site)
