"""Settings for LLM Orchestrator, all read from the environment (12-factor).

Defaults are safe to expose: DEBUG off, so ``SECRET_KEY`` (or ``SECRET_KEY_FILE``) must be set,
and only localhost is served until ``ALLOWED_HOSTS`` says otherwise. ``make run`` turns DEBUG on
for itself. SQLite in ``var/`` and Redis on localhost are the embedded defaults. The HTTPS flags
(secure cookies, HSTS, the proxy's ``X-Forwarded-Proto``) are off until set, so plain local http
works. Every variable is listed in docs/configuration.md.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from orchestrator_site.env import env_bool, env_int, env_list, env_secret, env_str
from orchestrator_site.redis_url import cache_config

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("VAR_DIR", str(BASE_DIR / "var")))

# Off unless set: a debug page shows settings and local variables (tokens, database URLs) to anyone.
DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_secret("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is off")
    SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"

# Host names this site answers to; anything else gets a 400 (no host-header tricks in built URLs).
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and Redoc as static files (/api/docs, /api/redoc): no CDN
    "django_rq",
    "axes",
    "routing",
    "jobs",
    "workers",
    "dashboard",
    "audit",
    "tenants",
    "openai_api",
    "batches",
    "webhooks",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = env_str("ROOT_URLCONF", "orchestrator_site.urls")
WSGI_APPLICATION = "orchestrator_site.wsgi.application"
# The API serves /jobs and /jobs/ alike; never redirect a POST to add a slash.
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------
# SQLite is the embedded default. WAL lets readers run beside the writer,
# synchronous=NORMAL is durable across process crashes in WAL mode, the busy
# timeout makes a writer wait instead of failing with "database is locked", and
# IMMEDIATE transactions take the write lock up front so two writers never
# deadlock upgrading a read lock. Persistent connections (CONN_MAX_AGE=None)
# avoid reopening the file on every request, which costs more than most queries.
DATABASE_URL = env_str("DATABASE_URL", "")
if not DATABASE_URL:
    VAR_DIR.mkdir(parents=True, exist_ok=True)  # the embedded default lives in var/
    DATABASE_URL = f"sqlite:///{VAR_DIR / 'orchestrator.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(DATABASE_URL)}
_db = DATABASES["default"]
if _db["ENGINE"] == "django.db.backends.sqlite3":
    _db["ENGINE"] = "orchestrator_site.sqlite"  # a process's threads take turns to write (see its docstring)
    _db["CONN_MAX_AGE"] = None
    _db["OPTIONS"] = {
        "timeout": env_int("SQLITE_BUSY_TIMEOUT_S", 30, minimum=1),
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL;PRAGMA foreign_keys=ON",
    }
else:
    _db["CONN_MAX_AGE"] = env_int("DB_CONN_MAX_AGE", 600, minimum=0)
    _db["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, status mirror, idempotency keys and RQ queues share one pool ---
# REDIS_URL: one server (redis://host:6379/0) or a Sentinel-watched primary
# (redis+sentinel://host:26379,host2:26379/mymaster/0): orchestrator_site/redis_url.py.
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
_redis_cache = cache_config(
    REDIS_URL, connect_timeout_s=2, socket_timeout_s=env_int("REDIS_SOCKET_TIMEOUT_S", 5, minimum=1)
)
CACHES = {"default": {"BACKEND": "django_redis.cache.RedisCache", "KEY_PREFIX": "llmo", **_redis_cache}}

JOB_QUEUES = ("high", "normal", "low")  # dequeue order: high before normal before low
# Fair share (jobs/fair_queue.py): a job waiting longer than this behind higher-priority work is served next.
MAX_STARVATION_S = env_int("MAX_STARVATION_S", 300, minimum=1)
JOB_TIMEOUT_S = env_int("JOB_TIMEOUT_S", 600, minimum=1)
# Pools of resident-model workers (an hf_local backend names its pool): each pool has its own
# '<pool>-high|normal|low' queues, so `manage.py rqworker gpu-high gpu-normal gpu-low` finds them.
WORKER_POOLS = env_list("WORKER_POOLS", ["gpu"])
RQ_QUEUES = {
    name: {
        "USE_REDIS_CACHE": "default",
        "DEFAULT_TIMEOUT": JOB_TIMEOUT_S + 60,
        "SERIALIZER": "rq.serializers.JSONSerializer",
    }
    for name in [*JOB_QUEUES, *(f"{pool}-{p}" for pool in WORKER_POOLS for p in JOB_QUEUES)]
}
RQ = {
    # Our worker class forces the JSON serializer and runs jobs without forking;
    # `manage.py rqworker high normal low` picks it up from here.
    "WORKER_CLASS": "workers.runtime.threaded.ThreadedWorker",
    "COMMIT_MODE": "on_db_commit",
}
RQ_SHOW_ADMIN_LINK = True

# --- Jobs -------------------------------------------------------------------
IDEMPOTENCY_TTL_S = env_int("IDEMPOTENCY_TTL_S", 24 * 3600, minimum=1)
JOB_STATUS_CACHE_TTL_S = env_int("JOB_STATUS_CACHE_TTL_S", 3600, minimum=1)
# Finished jobs older than this are deleted by the workers' periodic pass (0: keep them all).
JOB_RETENTION_DAYS = env_int("JOB_RETENTION_DAYS", 30, minimum=0)
JOB_LIMITS = {
    "prompt_chars": env_int("MAX_PROMPT_CHARS", 200_000, minimum=1),
    "messages": env_int("MAX_MESSAGES", 256, minimum=1),
    "images": env_int("MAX_IMAGES", 8, minimum=0),
    "image_bytes": env_int("MAX_IMAGE_BYTES", 10 * 1024 * 1024, minimum=1),
    "max_tokens": env_int("MAX_OUTPUT_TOKENS", 32_768, minimum=1),
    "context_tokens": env_int("MAX_CONTEXT_TOKENS", 131_072, minimum=1),  # num_ctx and the like in params
    "timeout_s": env_int("MAX_JOB_TIMEOUT_S", JOB_TIMEOUT_S, minimum=1),
    "json_field_bytes": env_int("MAX_JSON_FIELD_BYTES", 16 * 1024, minimum=64),
}
# Admission (tenants/admission.py). Jobs waiting at one priority over all its queues (0: no cap; over it, 429).
QUEUE_MAX_DEPTH = env_int("QUEUE_MAX_DEPTH", 0, minimum=0)
# Tokens a job without max_tokens reserves against its tenant's tokens_per_day until it ends.
TOKEN_RESERVATION_DEFAULT = env_int("TOKEN_RESERVATION_DEFAULT", 1024, minimum=0)
# The largest queue_timeout_s a submission may ask for.
MAX_QUEUE_TIMEOUT_S = env_int("MAX_QUEUE_TIMEOUT_S", 24 * 3600, minimum=1)
# Threads per web process that run Django under the ASGI server (orchestrator_site/asgi.py); requests
# that wait on a job (streams, ?wait=) do not hold one. Each thread may hold a database connection.
# One by default, as a sync worker: Django's requests are CPU work under one GIL, and more threads per
# process cost CPU and tail (P1 on 2 cores: 1 thread 535 req/s bare, p99 52 ms; 16 threads 371, p99
# 241 ms). Add processes (WEB_WORKERS) for throughput; raise this only for views that wait on slow I/O.
WEB_THREADS = env_int("WEB_THREADS", 1, minimum=1, maximum=512)
# The largest request body the ASGI web tier reads (bytes; 413 beyond): it spools a body past 1 MiB to a
# temporary file before Django sees it, so this bounds the disk a request can use. Django's own limits
# (MAX_REQUEST_BYTES for non-file bodies) apply inside it.
REQUEST_BODY_MAX_BYTES = env_int("REQUEST_BODY_MAX_BYTES", 256 * 1024 * 1024, minimum=1024)
# How long GET /jobs/<id>/result?wait= may wait (seconds).
RESULT_WAIT_MAX_S = env_int("RESULT_WAIT_MAX_S", 60, minimum=1, maximum=3600)
REQUEST_JSON_MAX_DEPTH = env_int("REQUEST_JSON_MAX_DEPTH", 32, minimum=2, maximum=256)  # deeper bodies get a 400
# Room for MAX_IMAGES base64 images plus the prompt; larger bodies get a 413.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int(
    "MAX_REQUEST_BYTES",
    JOB_LIMITS["images"] * (JOB_LIMITS["image_bytes"] * 4 // 3 + 1024) + JOB_LIMITS["prompt_chars"] * 4 + 1024 * 1024,
    minimum=1024,
)

# --- Files and batches (batches app; docs/batches.md) ---------------------------
FILES_MAX_BYTES = env_int("FILES_MAX_BYTES", 200 * 1024 * 1024, minimum=1024)  # one upload; larger: 413
BATCH_MAX_REQUESTS = env_int("BATCH_MAX_REQUESTS", 50_000, minimum=1)  # lines in one batch input file
# What completion_window "24h" means here: tests shorten it. Past it, unfinished lines expire.
BATCH_COMPLETION_WINDOW_S = env_int("BATCH_COMPLETION_WINDOW_S", 24 * 3600, minimum=1)
BATCH_CHUNK = env_int("BATCH_CHUNK", 500, minimum=1, maximum=10_000)  # jobs created per transaction
# A batch's lines on the queue at once (waiting or running); the rest are held in the database and
# pushed as earlier lines end, so a big batch neither fills Redis nor queues ahead of later work.
BATCH_WINDOW = env_int("BATCH_WINDOW", 1000, minimum=1, maximum=100_000)
BATCH_DEFAULT_PRIORITY = env_str("BATCH_DEFAULT_PRIORITY", "low")
if BATCH_DEFAULT_PRIORITY not in JOB_QUEUES:
    raise ImproperlyConfigured(f"BATCH_DEFAULT_PRIORITY={BATCH_DEFAULT_PRIORITY!r} is not one of {JOB_QUEUES}")
BATCH_ERRORS_MAX = env_int("BATCH_ERRORS_MAX", 100, minimum=1)  # line errors listed for a refused file

# --- Routing ----------------------------------------------------------------
# How long a web process reuses the live backend figures it read (milliseconds; 0 = every decision).
ROUTING_STATS_MAX_AGE_S = env_int("ROUTING_STATS_MAX_AGE_MS", 250, minimum=0, maximum=60_000) / 1000

# --- Workers ----------------------------------------------------------------
# Jobs one `rqworker` process runs at once, in threads (I/O-bound API backends; GPU workers batch instead).
MAX_CONCURRENCY = env_int("MAX_CONCURRENCY", 8, minimum=1, maximum=1024)
# Claimed jobs a worker may keep waiting beyond those running, so a freed thread starts its next job
# at once (highest priority first). At most this many, fewer as jobs run longer (about 50 ms worth of
# finishes, none for long jobs: workers/runtime/job_threads.py). Default: a quarter of MAX_CONCURRENCY. 0: none.
WORKER_PREFETCH = env_int("WORKER_PREFETCH", MAX_CONCURRENCY // 4, minimum=0, maximum=1024)
# A worker freezes what it loaded at start (Django, models) out of the garbage collector's view and
# collects its youngest generation every this many allocations instead of Python's 700: the ORM and
# the Redis client allocate a lot per job, so default-frequency collections cost a busy worker dearly.
# 0 keeps Python's defaults.
WORKER_GC_GEN0 = env_int("WORKER_GC_GEN0", 20_000, minimum=0, maximum=10_000_000)
# SIGTERM: stop taking jobs, let in-flight ones finish for this long, re-queue the rest, exit 0.
WORKER_SHUTDOWN_GRACE_S = env_int("WORKER_SHUTDOWN_GRACE_MS", 25_000, minimum=0) / 1000
# A call still running this long after its job's deadline (the adapter ignored its timeout) is written off.
WORKER_STUCK_GRACE_S = env_int("WORKER_STUCK_GRACE_MS", 30_000, minimum=0) / 1000
# How often a worker checks its running jobs for cancels and passed deadlines.
WORKER_WATCH_S = env_int("WORKER_WATCH_MS", 250, minimum=10, maximum=10_000) / 1000
# Crash recovery (workers/fleet/heartbeat.py, reconciler.py): a running job whose worker stopped beating is re-queued.
WORKER_HEARTBEAT_S = env_int("WORKER_HEARTBEAT_MS", 3000, minimum=50) / 1000
WORKER_LEASE_TTL_S = env_int("WORKER_LEASE_TTL_MS", 15000, minimum=1000) / 1000
RECONCILE_INTERVAL_S = env_int("RECONCILE_INTERVAL_MS", 15000, minimum=0) / 1000  # 0: only `manage.py reconcile`
MAX_DELIVERIES = env_int("MAX_DELIVERIES", 5, minimum=1)  # a job whose workers keep dying fails after this
# GPU worker (workers/runtime/gpu.py): dynamic batching of the waiting hf_local jobs.
BATCH_MAX = env_int("BATCH_MAX", 64, minimum=1, maximum=1024)  # jobs in one batch
BATCH_WAIT_MS = env_int("BATCH_WAIT_MS", 10, minimum=0, maximum=10_000)  # how long to wait for more jobs
# New tokens per batch round: a late job waits at most one round; a longer job continues in the next.
BATCH_ROUND_TOKENS = env_int("BATCH_ROUND_TOKENS", 128, minimum=1, maximum=32_768)
# Streaming (jobs/deltas.py): each job's output deltas in a capped, expiring Redis Stream.
STREAM_MAX_EVENTS = env_int("STREAM_MAX_EVENTS", 10_000, minimum=10)  # entries kept per job (approximate cap)
STREAM_TTL_S = env_int("STREAM_TTL_S", 3600, minimum=1)  # the stream expires this long after its last write
STREAM_FLUSH_S = env_int("STREAM_FLUSH_MS", 20, minimum=0, maximum=10_000) / 1000  # a job's writes at most this often
STREAM_FLUSH_EVENTS = env_int("STREAM_FLUSH_EVENTS", 64, minimum=1)  # ...unless this many deltas wait

# --- Webhooks (webhooks/, docs/webhooks.md) -------------------------------------
# Endpoint URLs on loopback and private (RFC 1918, ULA, CGNAT...) addresses are refused unless this is
# on (development and tests); link-local and cloud-metadata addresses are refused always.
WEBHOOK_ALLOW_PRIVATE = env_bool("WEBHOOK_ALLOW_PRIVATE", False)
# One delivery attempt: connect, send and each read are bounded by this, and the whole attempt by twice it.
WEBHOOK_TIMEOUT_S = env_int("WEBHOOK_TIMEOUT_MS", 15_000, minimum=100, maximum=120_000) / 1000
# A failing delivery is retried with exponential backoff (base, doubling, capped, ±25% jitter) until
# this long after its event; then it ends `failed`.
WEBHOOK_RETRY_WINDOW_S = env_int("WEBHOOK_RETRY_WINDOW_S", 24 * 3600, minimum=1)
WEBHOOK_RETRY_BASE_S = env_int("WEBHOOK_RETRY_BASE_MS", 5_000, minimum=1) / 1000
WEBHOOK_RETRY_MAX_S = env_int("WEBHOOK_RETRY_MAX_MS", 2 * 3600 * 1000, minimum=1) / 1000
# Deliveries one worker process sends at once, in threads beside its jobs (0: this worker sends none).
WEBHOOK_SENDER_THREADS = env_int("WEBHOOK_SENDER_THREADS", 4, minimum=0, maximum=64)
# How often an idle sender looks for retries that came due (a new event wakes one at once).
WEBHOOK_POLL_S = env_int("WEBHOOK_POLL_MS", 2_000, minimum=20, maximum=60_000) / 1000
# Bytes of a receiver's answer read (and the first 500 kept on the attempt); the rest is never read.
WEBHOOK_RESPONSE_MAX_BYTES = env_int("WEBHOOK_RESPONSE_MAX_BYTES", 4096, minimum=0, maximum=1_048_576)
# How long a process trusts its list of who has endpoints (a job's end checks it): a new endpoint
# receives the events of jobs that end from this long after it was created, in every process.
WEBHOOK_ENDPOINTS_CACHE_S = env_int("WEBHOOK_ENDPOINTS_CACHE_MS", 1_000, minimum=0, maximum=60_000) / 1000

# --- API --------------------------------------------------------------------
# How long each process remembers an API token (orchestrator_site/auth.py); 0: read it every request.
AUTH_TOKEN_CACHE_S = env_int("AUTH_TOKEN_CACHE_MS", 5000, minimum=0, maximum=300_000) / 1000
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "orchestrator_site.auth.CachedTokenAuthentication",
        "orchestrator_site.auth.BearerAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": ["orchestrator_site.parsers.BoundedJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "orchestrator_site.schema.AutoSchema",
    "EXCEPTION_HANDLER": "orchestrator_site.api.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM Orchestrator API",
    "DESCRIPTION": "Submit LLM/VLM inference jobs, poll their state and fetch results.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # No validator badge: Swagger UI would fetch it from validator.swagger.io.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
    ],
}

# --- Auth, i18n, static -----------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
# Uploaded batch input files and the output/error files batches write (batches app). FileSystemStorage
# under FILES_ROOT by default; FILES_STORAGE names any storage class (e.g. django-storages'
# storages.backends.s3.S3Storage, configured by its own AWS_* settings; then FILES_ROOT is unused).
FILES_ROOT = Path(env_str("FILES_ROOT", str(VAR_DIR / "files")))
FILES_STORAGE = env_str("FILES_STORAGE", "django.core.files.storage.FileSystemStorage")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "files": {
        "BACKEND": FILES_STORAGE,
        "OPTIONS": {"location": str(FILES_ROOT)} if FILES_STORAGE.endswith("FileSystemStorage") else {},
    },
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
# Serve admin/DRF static files from the app dirs when collectstatic has not run (dev, tests).
WHITENOISE_USE_FINDERS = DEBUG

# --- HTTPS (behind a TLS-terminating proxy) -------------------------------------
# Off by default so plain http on localhost works; turn them on where the site is served over HTTPS.
# SECURE_PROXY_SSL_HEADER=1 trusts the proxy's X-Forwarded-Proto: set it only when a proxy you run
# always sets (or strips) that header, or any client could claim to be on HTTPS.
if env_bool("SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SECURE_CONTENT_TYPE_NOSNIFF = True

# --- Login throttling (django-axes) ------------------------------------------------
# Every password login (/admin/login/, /api-auth/login/) goes through Django's authenticate(), where
# axes counts failures per user name *and* client address: LOGIN_FAILURE_LIMIT failures lock that
# pair out for LOGIN_COOLOFF_MINUTES (a further failure while locked restarts the clock); a success
# before the limit resets the count. Keying on the pair keeps an attacker from locking a real user
# out from elsewhere. API tokens and sessions do not authenticate with a password, so they are not
# counted. Attempts are rows in the database (shown in the admin; `manage.py axes_reset` unlocks).
# Behind proxies, TRUSTED_PROXY_COUNT says how many append to X-Forwarded-For (else every client
# would share the proxy's address): orchestrator_site/client_ip.py.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # refuses a locked-out pair before the password is checked
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_HTTP_RESPONSE_CODE = 429
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0, minimum=0, maximum=10)
AXES_CLIENT_IP_CALLABLE = "orchestrator_site.client_ip.client_ip"

# --- Logging: JSON lines on stdout --------------------------------------------
LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"}:
    raise ImproperlyConfigured(f"LOG_LEVEL={LOG_LEVEL!r} is not a log level")
LOG_LEVEL = "WARNING" if LOG_LEVEL == "WARN" else LOG_LEVEL
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "orchestrator_site.logs.JsonFormatter"}},
    "handlers": {"stdout": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}},
    "root": {"handlers": ["stdout"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "rq.worker": {"level": LOG_LEVEL},
    },
}

# --- Observability: metrics, traces; see orchestrator_site/metrics.py and tracing.py ---
# /metrics answers a bearer token equal to METRICS_TOKEN (or METRICS_TOKEN_FILE), or a staff session.
METRICS_TOKEN = env_secret("METRICS_TOKEN")
# Tracing is on only when OTEL_EXPORTER_OTLP_ENDPOINT is set (read by orchestrator_site.tracing at start-up).
INSTALLED_APPS += ["orchestrator_site.apps.ObservabilityConfig"]
# django-prometheus: HTTP request/response/latency metrics of this process (or of every gunicorn
# worker on the host when PROMETHEUS_MULTIPROC_DIR is set). Outermost, so it times everything.
MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    *MIDDLEWARE,
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # Last, as axes requires: turns a locked-out login into its 429 answer.
    "axes.middleware.AxesMiddleware",
]
