from routing.api.urls import OptionalSlashRouter
from tenants.api.views import TenantViewSet

router = OptionalSlashRouter()
router.register("tenants", TenantViewSet, basename="tenant")
urlpatterns = router.urls
