"""The worker class behind ``manage.py rqworker`` (set in ``settings.RQ['WORKER_CLASS']``)."""

from __future__ import annotations

import os
import socket
from typing import Any

from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker


class OrchestratorWorker(SimpleWorker):
    """Runs jobs in the worker process itself, with the JSON serializer.

    No fork per job: forking costs most of RQ's per-job time (~69 vs ~267 no-op jobs/s
    on our machines), drops the process's warm DB and Redis connections, and breaks
    CUDA. ``rqworker`` passes its own ``--serializer`` default (pickle); we always use
    JSON because our RQ jobs carry only a job id and pickle is never needed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["serializer"] = JSONSerializer
        # host.pid instead of RQ's random hex, so a job's `worker` says where it ran.
        kwargs["name"] = kwargs.get("name") or f"{socket.gethostname()}.{os.getpid()}"
        super().__init__(*args, **kwargs)
