"""The web tier as one ASGI application (``gunicorn -k uvicorn_worker.UvicornWorker``).

Django runs as its WSGI self in a thread pool (``orchestrator_site.wsgi_bridge``, one thread hand-off
per request): measured on ``POST /jobs``, Django's own ASGI handler, which adapts every request through
asgiref's thread-sensitive machinery, costs twice the CPU, and a generic adapter (a2wsgi) a third more
than sync workers (docs/performance.md, "The web tier"). Requests that wait on a job
leave Django with a relay ticket and wait on the event loop instead (``orchestrator_site.relaying``),
so thousands of open streams hold coroutines, not threads. ``WEB_THREADS`` bounds the threads.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")

django_application = get_wsgi_application()

from django.conf import settings  # noqa: E402

from jobs.api import stream  # noqa: E402
from openai_api import relay as chat  # noqa: E402
from orchestrator_site.relaying import RelayMiddleware  # noqa: E402
from orchestrator_site.wsgi_bridge import WsgiBridge  # noqa: E402

RELAYS = {"job.stream": stream.relay_events, "job.wait": stream.relay_result, "chat": chat.relay_completion}

application = RelayMiddleware(
    WsgiBridge(django_application, threads=settings.WEB_THREADS, max_body=settings.REQUEST_BODY_MAX_BYTES), RELAYS
)
