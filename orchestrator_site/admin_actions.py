"""Admin actions a user may not run are refused, not merely hidden."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse


class RefuseForbiddenActionsMixin:
    """For a ``ModelAdmin`` whose actions declare ``@admin.action(permissions=[...])``.

    Django already leaves such an action out of the menu for a user who lacks the permission, and
    when one is posted anyway it answers with a redirect and "No action selected". A forged POST
    deserves a plain 403 instead, so the refusal is visible (and testable) as a refusal.
    """

    def changelist_view(self, request: HttpRequest, extra_context=None) -> HttpResponse:
        if request.method == "POST":
            allowed = self.get_actions(request)  # type: ignore[attr-defined]
            if any(name and name not in allowed for name in request.POST.getlist("action")):
                raise PermissionDenied
        return super().changelist_view(request, extra_context)  # type: ignore[misc]
