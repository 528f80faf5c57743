from django.urls import re_path

from batches.api import views

# Before openai_api's catch-all for unknown /v1 paths (orchestrator_site/urls.py includes these first).
urlpatterns = [
    re_path(r"^v1/files/?$", views.Files.as_view(), name="openai-files"),
    re_path(r"^v1/files/(?P<file_id>[\w-]+)/content/?$", views.FileContent.as_view(), name="openai-file-content"),
    re_path(r"^v1/files/(?P<file_id>[\w-]+)/?$", views.FileDetail.as_view(), name="openai-file"),
    re_path(r"^v1/batches/?$", views.Batches.as_view(), name="openai-batches"),
    re_path(r"^v1/batches/(?P<batch_id>[\w-]+)/cancel/?$", views.BatchCancel.as_view(), name="openai-batch-cancel"),
    re_path(r"^v1/batches/(?P<batch_id>[\w-]+)/?$", views.BatchDetail.as_view(), name="openai-batch"),
]
