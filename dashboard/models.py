"""An admin-only model without a table, so the dashboard shows up in the admin index (django-rq's pattern)."""

from django.db import models


class Dashboard(models.Model):
    """No rows, no table: it gives the dashboard an entry in the admin's app list and sidebar."""

    class Meta:
        managed = False
        default_permissions = ()
        verbose_name = "live dashboard"
        verbose_name_plural = "live dashboard"

    def __str__(self) -> str:
        return "live dashboard"
