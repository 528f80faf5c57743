from django.urls import re_path

from openai_api.api import views

urlpatterns = [
    re_path(r"^v1/chat/completions/?$", views.ChatCompletions.as_view(), name="openai-chat-completions"),
    re_path(r"^v1/models/?$", views.Models.as_view(), name="openai-models"),
    re_path(r"^v1/models/(?P<model>.+?)/?$", views.ModelDetail.as_view(), name="openai-model"),
]
