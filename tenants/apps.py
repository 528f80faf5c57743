from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from jobs import hooks
        from tenants import admission

        # A job's tokens and cost settle against its tenant's limits once, when it ends.
        hooks.on_ended(admission.settle_ended)
        hooks.on_reopened(admission.reserve_reopened)
