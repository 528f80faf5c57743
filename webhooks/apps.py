from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "webhooks"
    verbose_name = "Webhooks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from batches import hooks as batch_hooks
        from jobs import hooks
        from webhooks import events, subscribers
        from webhooks.models import WebhookEndpoint

        # A job's end becomes a delivery to each endpoint of its owner or tenant subscribed to it.
        hooks.on_ended(events.jobs_ended)
        batch_hooks.on_batch_ended(events.batch_ended)
        # Every process's list of who has endpoints follows a change (at once here, within
        # WEBHOOK_ENDPOINTS_CACHE_S elsewhere).
        post_save.connect(subscribers.changed, sender=WebhookEndpoint, dispatch_uid="webhooks-endpoint-saved")
        post_delete.connect(subscribers.changed, sender=WebhookEndpoint, dispatch_uid="webhooks-endpoint-deleted")
