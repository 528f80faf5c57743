from django.urls import re_path

from openai_api.api import views

urlpatterns = [
    re_path(r"^v1/chat/completions/?$", views.ChatCompletions.as_view(), name="openai-chat-completions"),
    re_path(r"^v1/models/?$", views.Models.as_view(), name="openai-models"),
    re_path(r"^v1/models/(?P<model>[\s\S]+?)/?$", views.ModelDetail.as_view(), name="openai-model"),
    # Anything else under /v1 (an endpoint we do not offer, e.g. /v1/embeddings): OpenAI's 404.
    re_path(r"^v1/", views.UnknownEndpoint.as_view(), name="openai-unknown"),
]
