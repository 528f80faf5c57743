from django.urls import re_path

from jobs.api import views

# Seed-compatible paths, with or without the trailing slash.
urlpatterns = [
    re_path(r"^jobs/?$", views.JobListCreate.as_view(), name="job-list"),
    re_path(r"^jobs/(?P<job_id>[^/]+)/?$", views.JobDetail.as_view(), name="job-detail"),
    re_path(r"^jobs/(?P<job_id>[^/]+)/result/?$", views.JobResult.as_view(), name="job-result"),
    re_path(r"^jobs/(?P<job_id>[^/]+)/stream/?$", views.JobStream.as_view(), name="job-stream"),
    re_path(r"^jobs/(?P<job_id>[^/]+)/cancel/?$", views.JobCancel.as_view(), name="job-cancel"),
]
