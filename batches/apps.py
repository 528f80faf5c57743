from django.apps import AppConfig


class BatchesConfig(AppConfig):
    name = "batches"
    verbose_name = "Batches"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from batches import progress
        from jobs import hooks

        # A line's outcome counts toward its batch once, when its job ends; the last one finalizes.
        hooks.on_ended(progress.count_ended)
