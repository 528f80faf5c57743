from rest_framework.routers import SimpleRouter

from routing.api.views import BackendViewSet, RoutingPolicyViewSet


class OptionalSlashRouter(SimpleRouter):
    """Seed-compatible paths answer with and without the trailing slash (no redirect for POSTs)."""

    def __init__(self) -> None:
        super().__init__()
        self.trailing_slash = "/?"


router = OptionalSlashRouter()
router.register("backends", BackendViewSet, basename="backend")
router.register("policies", RoutingPolicyViewSet, basename="policy")
urlpatterns = router.urls
