#!/usr/bin/env bash
# The script behind `make test`: lint, Django checks, then the suite on SQLite and on PostgreSQL.
#   TEST_REDIS_URL     Redis database the tests flush (default redis://127.0.0.1:6379/15; never db 0)
#   TEST_DATABASE_URL  PostgreSQL for the second run (default postgres://postgres@127.0.0.1:5432/test)
#   REQUIRE_POSTGRES=1 fail instead of skipping the PostgreSQL run when it does not answer (CI sets it)
# Extra arguments go to pytest, e.g. `make test` → all; `bash tools/test.sh -k idempotency`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
export TEST_REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/15}"
PG_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"

# A Redis for the tests: the one at TEST_REDIS_URL, or a private one started (and stopped) here.
REDIS_URL="$TEST_REDIS_URL" REDIS_PURPOSE="the tests" source tools/ensure_redis.sh
trap 'stop_private_redis' EXIT

# Chromium for the real-browser tests (tests/browser); they skip, saying why, when none can be had.
source tools/ensure_browser.sh

echo "==> ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .

echo "==> manage.py check / makemigrations --check"
DJANGO_SETTINGS_MODULE=tests.settings "$PY" manage.py check --fail-level WARNING
DJANGO_SETTINGS_MODULE=tests.settings "$PY" manage.py makemigrations --check --dry-run

echo "==> tests on SQLite"
env -u DATABASE_URL "$VENV/bin/pytest" "$@"

if "$PY" - "$PG_URL" <<'PYEOF' 2>/dev/null; then
import sys, psycopg
# The server must answer; the named database need not exist (pytest-django creates test_<name>).
try:
    psycopg.connect(sys.argv[1], connect_timeout=3).close()
except psycopg.OperationalError as exc:
    if "does not exist" not in str(exc):
        raise
    psycopg.connect(sys.argv[1], dbname="postgres", connect_timeout=3).close()
PYEOF
  # Only the tests that use a database run again here (tests/conftest.py deselects the others).
  echo "==> tests on PostgreSQL ($PG_URL): those that use the database"
  DATABASE_URL="$PG_URL" "$VENV/bin/pytest" "$@"
elif [ "${REQUIRE_POSTGRES:-0}" = "1" ]; then
  echo "PostgreSQL does not answer at $PG_URL and REQUIRE_POSTGRES=1" >&2
  exit 1
else
  echo "==> SKIPPED the PostgreSQL run: nothing answers at $PG_URL (set TEST_DATABASE_URL)" >&2
fi
