from rest_framework.routers import SimpleRouter

from routing.api.views import BackendViewSet, RoutingPolicyViewSet

router = SimpleRouter(trailing_slash="/?")
router.register("backends", BackendViewSet, basename="backend")
router.register("policies", RoutingPolicyViewSet, basename="policy")
urlpatterns = router.urls
