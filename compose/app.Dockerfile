# The control plane image: Django + DRF under gunicorn. Build from the repository root:
#   docker build -f compose/app.Dockerfile -t llm-orchestrator-app .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DJANGO_SETTINGS_MODULE=orchestrator_site.settings \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus-multiproc

WORKDIR /app
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY . .
# Static files as production serves them: with DEBUG off the settings pick whitenoise's manifest
# storage, which writes the hashed, compressed copies and the staticfiles.json that DEBUG=0 pages
# look names up in (collected with DEBUG=1 there is no manifest, and every admin page answers 500).
# The key only lets the settings load for this step; the image's environment has none. The
# multiprocess metrics directory does not exist yet, so this step runs without it.
# tests/test_production_image.py runs this very line.
RUN env -u PROMETHEUS_MULTIPROC_DIR DEBUG=0 SECRET_KEY=build-only-collectstatic-key python manage.py collectstatic --noinput

# The metrics directory exists (owned by the app user) so that one-off `manage.py` commands in the
# container work too; gunicorn empties it at start (gunicorn.conf.py).
RUN useradd --system --uid 1000 app \
    && mkdir -p /app/var "$PROMETHEUS_MULTIPROC_DIR" \
    && chown -R app /app/var "$PROMETHEUS_MULTIPROC_DIR"
USER app
EXPOSE 8000
# gunicorn.conf.py: workers from WEB_CONCURRENCY, JSON logs, prometheus multiprocess clean-up.
CMD ["gunicorn", "-c", "compose/gunicorn.conf.py", "orchestrator_site.asgi:application"]
