from django.urls import re_path

from webhooks.api import views

# With or without the trailing slash, as /jobs.
urlpatterns = [
    re_path(r"^webhooks/?$", views.WebhookListCreate.as_view(), name="webhook-list"),
    re_path(r"^webhooks/(?P<webhook_id>[^/]+)/?$", views.WebhookDetail.as_view(), name="webhook-detail"),
]
