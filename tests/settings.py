"""Test settings: the real settings, pointed at a Redis database of their own.

Tests flush their Redis database, so they must never share one with a running
system: the test database is ``TEST_REDIS_URL`` (default: the local server's db 15).
``DATABASE_URL`` picks SQLite (default) or PostgreSQL as usual; pytest-django
creates and drops the ``test_`` database.
"""

import os
import tempfile

os.environ["REDIS_URL"] = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# The processes tests start (gunicorn, workers, a Django test Client in a subprocess) inherit these:
# a key of their own, the test Client's host name, and DEBUG on so they serve static files from the
# app directories without a collectstatic run. Production mode (DEBUG off, the manifest storage,
# collected files) has its own test: tests/test_production_image.py.
os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-any-deployment")
os.environ.setdefault("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
os.environ.setdefault("DEBUG", "1")
os.environ.setdefault("LOG_LEVEL", "WARNING")
os.environ.setdefault("VAR_DIR", tempfile.mkdtemp(prefix="llmo-test-var-"))

from orchestrator_site.settings import *  # noqa: E402,F403
from orchestrator_site.settings import DATABASES, VAR_DIR  # noqa: E402

# A file, not :memory:, so worker and web processes started by tests share it.
if "sqlite" in DATABASES["default"]["ENGINE"]:
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast user creation

STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
