"""The web tier as one ASGI application (``gunicorn -k uvicorn_worker.UvicornWorker``).

Django runs as its WSGI self in a thread pool (``a2wsgi``): measured on ``POST /jobs``, that costs
less than half the CPU per request of Django's own ASGI handler, which adapts every request through
asgiref's thread-sensitive machinery (docs/performance.md, "The OpenAI-compatible API"). Requests that wait on a job
leave Django with a relay ticket and wait on the event loop instead (``orchestrator_site.relaying``),
so thousands of open streams hold coroutines, not threads. ``WEB_THREADS`` bounds the threads.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")

django_application = get_wsgi_application()

from a2wsgi import WSGIMiddleware  # noqa: E402
from django.conf import settings  # noqa: E402

from jobs.api import stream  # noqa: E402
from openai_api import relay as chat  # noqa: E402
from orchestrator_site.relaying import RelayMiddleware  # noqa: E402

RELAYS = {"job.stream": stream.relay_events, "job.wait": stream.relay_result, "chat": chat.relay_completion}

application = RelayMiddleware(WSGIMiddleware(django_application, workers=settings.WEB_THREADS), RELAYS)
