"""Any change to a backend or a policy tells every process to reload its routing snapshot."""

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from routing import registry
from routing.models import Backend, RoutingPolicy


@receiver([post_save, post_delete], sender=Backend)
@receiver([post_save, post_delete], sender=RoutingPolicy)
def routing_changed(sender, **kwargs) -> None:
    registry.invalidate()
