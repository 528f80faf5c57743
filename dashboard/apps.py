from django.apps import AppConfig


class DashboardConfig(AppConfig):
    """The operators' live dashboard at ``/admin/dashboard/`` (queues, latency, routing, backends, workers)."""

    name = "dashboard"
    verbose_name = "Operations"
