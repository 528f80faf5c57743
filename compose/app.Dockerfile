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
# Static files are served by whitenoise from STATIC_ROOT (hashed names; DEBUG=0 needs them).
RUN DEBUG=1 python manage.py collectstatic --noinput

RUN useradd --system --uid 1000 app && mkdir -p /app/var && chown -R app /app/var
USER app
EXPOSE 8000
# gunicorn.conf.py: workers from WEB_CONCURRENCY, JSON logs, prometheus multiprocess clean-up.
CMD ["gunicorn", "-c", "compose/gunicorn.conf.py", "orchestrator_site.wsgi"]
