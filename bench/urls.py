"""URLconf for benchmarks: the real site plus ``bench/bare-submit``, a baseline without DRF.

Run the server with ``ROOT_URLCONF=bench.urls``. The baseline does what ``POST /jobs``
must do at minimum (parse JSON, insert a queued Job row, enqueue it on RQ after commit,
answer 202) but with no DRF, authentication, validation, idempotency, routing or
status mirror, so the ratio between the two is the price of those layers.
"""

from __future__ import annotations

import json
import uuid

from django.db import transaction
from django.http import HttpRequest, HttpResponseNotAllowed, JsonResponse
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt

from jobs import queueing
from jobs.models import Job, JobState


@csrf_exempt
def bare_submit(request: HttpRequest) -> JsonResponse | HttpResponseNotAllowed:
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    data = json.loads(request.body)
    job_id = uuid.uuid4()
    with transaction.atomic():
        job = Job.objects.create(
            id=job_id,
            state=JobState.QUEUED,
            priority=data.get("priority") or "normal",
            prompt=data.get("prompt") or "",
            timeout_s=60,
            backend_name="dev",
            queue="normal",
            rq_job_id=str(job_id),
        )
        # Same queue objects as the API (built once per process by jobs.queueing).
        transaction.on_commit(lambda: queueing.enqueue(job))
    return JsonResponse({"id": str(job.pk), "state": "queued"}, status=202)


urlpatterns = [
    path("bench/bare-submit", bare_submit, name="bench-bare-submit"),
    path("", include("orchestrator_site.urls")),
]
