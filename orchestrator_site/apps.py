"""Process start-up for observability (an app so it runs in web, worker and command processes alike)."""

from __future__ import annotations

from django.apps import AppConfig


class ObservabilityConfig(AppConfig):
    name = "orchestrator_site"
    label = "observability"
    verbose_name = "Observability"

    def ready(self) -> None:
        # Before the WSGI handler loads MIDDLEWARE, so the OTEL middleware it inserts takes effect.
        from orchestrator_site import tracing

        tracing.setup_from_env()
