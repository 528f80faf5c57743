# The worker image: the same code and settings, running `manage.py rqworker <queues>`.
# API backends (ollama, OpenAI-compatible, dev) need nothing more. For a GPU pool (hf_local),
# start FROM a CUDA runtime image with torch instead and keep one worker process per GPU.
#   docker build -f compose/worker.Dockerfile -t llm-orchestrator-worker .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DJANGO_SETTINGS_MODULE=orchestrator_site.settings \
    WORKER_QUEUES="high normal low"

WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY . .

RUN useradd --system --uid 1000 app && mkdir -p /app/var && chown -R app /app/var
USER app
# exec: rqworker is PID 1's child-free replacement, so SIGTERM from `docker stop` reaches it
# (warm shutdown: finish the current job, then exit).
CMD ["sh", "-c", "exec python manage.py rqworker $WORKER_QUEUES"]
