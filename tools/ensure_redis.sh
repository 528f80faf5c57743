#!/usr/bin/env bash
# Make sure Redis answers at $REDIS_URL (default redis://127.0.0.1:6379/0).
#
# Sourcing this file does the work, right there (tools/run.sh, tools/test.sh):
#     REDIS_URL=... REDIS_PURPOSE="the tests" source tools/ensure_redis.sh
#     trap stop_private_redis EXIT     # (run.sh calls it from its own clean-up)
#   - A Redis that already answers is used as it is: never flushed, never stopped.
#   - If nothing listens there (and the URL names this machine), a private, throw-away
#     redis-server is started in the background (no persistence, files in var/redis,
#     log in var/log/redis.log); REDIS_PID is then its pid, and stop_private_redis stops it.
#   - redis-server is installed with apt-get only when it is needed and missing (as root);
#     otherwise the script says what to install and exits 1.
# Run directly (`bash tools/ensure_redis.sh`) it does the same and keeps a private Redis in
# the foreground until Ctrl-C.
#
# Needs $VENV (default .venv) with the `redis` package: the check uses the very client
# the app uses, so "answers" means "answers to Django" (password, TLS and db included).

REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
REDIS_PID=""
_REDIS_FOR="${REDIS_PURPOSE:-the app}"
_REDIS_PY="${VENV:-.venv}/bin/python"
_REDIS_VAR="${VAR_DIR:-var}"
_REDIS_LOG="$_REDIS_VAR/log/redis.log"

# Print "<scheme> <host> <port> <db> <has-credentials>" for $REDIS_URL.
_redis_parse_url() {
  "$_REDIS_PY" - "$REDIS_URL" <<'PY'
import sys
from urllib.parse import urlsplit

url = urlsplit(sys.argv[1])
path = url.path.strip("/")
db = path if path.isdigit() else "0"
creds = "yes" if (url.username or url.password) else "no"
print(url.scheme or "redis", url.hostname or "127.0.0.1", url.port or 6379, db, creds)
PY
}

# Exit 0: Redis answers PING. Exit 3: nothing listens (connection refused / no socket).
# Exit 4: something is there but does not answer as a usable Redis (reason on stderr).
_redis_probe() {
  "$_REDIS_PY" - "$REDIS_URL" <<'PY'
import sys

import redis

url = sys.argv[1]
try:
    redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping()
except redis.exceptions.AuthenticationError as exc:
    print(f"authentication failed: {exc}", file=sys.stderr)
    sys.exit(4)
except redis.exceptions.ConnectionError as exc:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, (ConnectionRefusedError, FileNotFoundError)) or "Connection refused" in str(exc):
        sys.exit(3)
    print(exc, file=sys.stderr)
    sys.exit(4)
except Exception as exc:  # a timeout, a non-Redis server on that port, a bad URL...
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(4)
PY
}

# The redis-server binary, installed with apt-get when we are root and it is missing.
_redis_need_binary() {
  command -v redis-server >/dev/null 2>&1 && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "!! redis-server is not installed, and nothing answers at $REDIS_URL." >&2
    echo "!! Install it and run this again:   sudo apt-get install redis-server" >&2
    echo "!! (or start any Redis and point REDIS_URL at it)" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "!! redis-server is not installed and there is no apt-get here: install Redis with your package manager," >&2
    echo "!! or start any Redis and point REDIS_URL at it." >&2
    exit 1
  fi
  echo "==> installing redis-server (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  command -v redis-server >/dev/null 2>&1 || { echo "!! apt-get did not install redis-server" >&2; exit 1; }
}

ensure_redis() {
  if [ ! -x "$_REDIS_PY" ]; then
    echo "!! $_REDIS_PY not found: create the virtualenv first (make venv)" >&2
    exit 1
  fi
  local scheme host port creds rc=0
  read -r scheme host port _ creds < <(_redis_parse_url)

  _redis_probe || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "==> Redis for $_REDIS_FOR answers at $REDIS_URL: using it as it is"
    return 0
  elif [ "$rc" -ne 3 ]; then
    echo "!! Something listens at $REDIS_URL but does not answer as Redis (see above)." >&2
    echo "!! Fix it, or set REDIS_URL to another Redis." >&2
    exit 1
  fi

  # Nothing listens. Only a plain redis:// URL naming this machine can be served by us.
  case "$host" in
    localhost | 127.* | ::1) ;;
    *)
      echo "!! Nothing answers at $REDIS_URL, and $host is not this machine: start that Redis, or unset REDIS_URL." >&2
      exit 1
      ;;
  esac
  if [ "$scheme" != "redis" ] || [ "$creds" = "yes" ]; then
    echo "!! Nothing answers at $REDIS_URL. A private Redis is only started for a plain redis://host:port/db URL" >&2
    echo "!! (no TLS, no unix socket, no password): start that Redis yourself, or unset REDIS_URL." >&2
    exit 1
  fi

  _redis_need_binary
  # Installing the Debian package may have started the system service on that very port.
  rc=0
  _redis_probe 2>/dev/null || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "==> Redis for $_REDIS_FOR answers at $REDIS_URL: using it as it is"
    return 0
  fi

  local bind="$host"
  [ "$host" = "localhost" ] && bind="127.0.0.1 -::1" # "-": bind ::1 only if this host has IPv6
  mkdir -p "$_REDIS_VAR/redis" "$_REDIS_VAR/log"
  echo "==> nothing answers at $REDIS_URL: starting a private redis-server for $_REDIS_FOR on $host:$port (log: $_REDIS_LOG)"
  # setsid: its own session, so Ctrl-C reaches only run.sh, which stops things in order
  # (web and worker first, Redis last). $bind is unquoted on purpose (one or two addresses).
  # shellcheck disable=SC2086
  setsid redis-server --bind $bind --port "$port" --save "" --appendonly no \
    --dir "$_REDIS_VAR/redis" --daemonize no >"$_REDIS_LOG" 2>&1 </dev/null &
  REDIS_PID=$!

  local i
  for ((i = 0; i < 50; i++)); do # up to ~10 s
    if ! kill -0 "$REDIS_PID" 2>/dev/null; then
      REDIS_PID=""
      echo "!! redis-server exited at start-up; last lines of $_REDIS_LOG:" >&2
      tail -n 20 "$_REDIS_LOG" >&2
      exit 1
    fi
    _redis_probe 2>/dev/null && { echo "    Redis is up (pid $REDIS_PID)"; return 0; }
    sleep 0.2
  done
  echo "!! redis-server (pid $REDIS_PID) did not answer within 10 s; last lines of $_REDIS_LOG:" >&2
  tail -n 20 "$_REDIS_LOG" >&2
  stop_private_redis
  exit 1
}

# Stop the private Redis, if ensure_redis started one, and wait for it. No-op otherwise.
stop_private_redis() {
  [ -n "$REDIS_PID" ] || return 0
  if kill -0 "$REDIS_PID" 2>/dev/null; then
    kill -TERM "$REDIS_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do
      kill -0 "$REDIS_PID" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$REDIS_PID" 2>/dev/null || true
  fi
  wait "$REDIS_PID" 2>/dev/null || true
  REDIS_PID=""
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  # Run directly: ensure Redis, and keep a private one in the foreground until Ctrl-C.
  set -euo pipefail
  cd "$(dirname "$0")/.."
  trap 'stop_private_redis' EXIT
  trap 'exit 0' INT TERM HUP
  ensure_redis
  if [ -n "$REDIS_PID" ]; then
    echo "==> private Redis running at $REDIS_URL; Ctrl-C stops it"
    wait "$REDIS_PID"
  fi
else
  # Sourced: do it now, in the caller's shell (so REDIS_PID is the caller's child).
  ensure_redis
fi
