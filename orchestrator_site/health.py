"""``/healthz`` (the process answers) and ``/readyz`` (its database and Redis answer). No auth.

``/readyz`` names the dependency that is down and nothing more: it answers anyone, and a driver's
exception text carries host names, user names and ports. The text goes to the log instead.
"""

from __future__ import annotations

import logging

from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from orchestrator_site.redis import redis_client

log = logging.getLogger(__name__)


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _check_redis() -> None:
    redis_client().ping()


CHECKS = {"database": _check_database, "redis": _check_redis}


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    checks: dict[str, str] = {}
    for name, check in CHECKS.items():
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:  # any failure means "not ready"
            log.warning("dependency down", extra={"dependency": name, "error": f"{type(exc).__name__}: {exc}"})
            checks[name] = "down"
    ready = all(v == "ok" for v in checks.values())
    return JsonResponse({"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503)
